"""Shared fixtures. The real Fashion-MNIST is loaded once per session (about 3 s)."""

from __future__ import annotations

import pytest
import torch

from gefl.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    return load_dataset("fashion-mnist")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach for the internet: a missing dataset must fail, not download."""
    monkeypatch.setenv("GEFL_NO_DOWNLOAD", "1")
    torch.manual_seed(0)
