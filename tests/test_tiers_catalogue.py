"""configs/tiers.yaml, the tier catalogue, must describe the tiers that exist, as they are now.

benchmarks/tiers.py writes it and the device policy refuses tiers on its figures, so a stale
catalogue (a tier added, a head changed) or an irreproducible memory figure would silently send
devices the wrong tier. Memory comes per torch build (the plain columns: CUDA build; _cpu: the
CPU-only build boards run). The memory of the build this suite runs is re-measured; the other
build's is benchmarks/tiers.py's to measure (`--python`), with the figures it writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from gefl.tiers.models import OPT_IN_TIERS, count_parameters, get_model

TORCHVISION_TIERS = ("mobilenet-v3-small", "resnet18")

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "configs" / "tiers.yaml"
COLUMNS = ("params", "train_mflops_per_sample", "train_memory_mb", "train_samples_per_s")


@pytest.fixture(scope="module")
def catalogue() -> dict:
    return yaml.safe_load(CATALOGUE.read_text())


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/tiers.py itself (benchmarks/ is not a package), so the test measures as it does."""
    spec = importlib.util.spec_from_file_location("benchmarks_tiers", ROOT / "benchmarks" / "tiers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _registered_tiers() -> list[str]:
    """gefl.tiers.models.list_tiers() of a fresh process: tests (and the README's example) register tiers
    of their own in this one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "import json; from gefl.tiers.models import list_tiers; print(json.dumps(list_tiers()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def test_catalogue_lists_exactly_the_registered_tiers_with_positive_columns(catalogue):
    assert CATALOGUE.read_text().startswith("# Tier catalogue") and "benchmarks/tiers.py" in CATALOGUE.read_text()
    assert catalogue["reference_tier"] == "cnn3" and catalogue["batch_size"] == 64
    assert catalogue["runtime_memory_mb"] > 0 and catalogue["machine"]
    # The CUDA build maps its CUDA libraries even without a GPU: hundreds of MB the CPU build does not.
    assert 0 < catalogue["runtime_memory_mb_cpu"] < catalogue["runtime_memory_mb"]
    assert "CUDA build" in catalogue["torch"] and "CPU build" in catalogue["torch_cpu"]
    assert list(catalogue["tiers"]) == _registered_tiers()
    for tier, row in catalogue["tiers"].items():
        for column in COLUMNS:
            assert isinstance(row[column], int | float) and row[column] > 0, (tier, column, row.get(column))
        assert row["opt_in"] is (tier in OPT_IN_TIERS), tier
        cpu = row["train_memory_mb_cpu"]
        if cpu is None:  # only where the CPU venv cannot build the tier
            assert tier in TORCHVISION_TIERS, tier
        else:
            # What training adds (tensors, gradients, optimizer state) hardly depends on the build.
            assert abs(cpu - row["train_memory_mb"]) <= max(0.1 * row["train_memory_mb"], 1.0), (tier, cpu)


def test_catalogue_params_are_the_models_and_flops_grow_with_them(catalogue):
    rows = catalogue["tiers"]
    for tier, row in rows.items():
        assert row["params"] == count_parameters(get_model(tier)), tier
    assert rows["resnet18"]["train_mflops_per_sample"] > rows["cnn5"]["train_mflops_per_sample"]
    assert rows["cnn5"]["train_mflops_per_sample"] > rows["cnn3"]["train_mflops_per_sample"]


def _remeasures(catalogue: dict, bench: ModuleType, tier: str, python: str, column: str) -> None:
    listed = catalogue["tiers"][tier][column]
    now = bench.measure_train_memory(tier, runs=1, python=python)
    assert abs(now - listed) <= max(0.2 * listed, 2.0), f"{tier}: {now:.2f} MB now, {listed:.2f} MB as {column}"


@pytest.mark.parametrize("tier", ["cnn3", "cnn5"])
def test_train_memory_remeasures_within_tolerance(catalogue, bench, tier):
    """Under this interpreter, against the column of its own build."""
    column = "train_memory_mb" if torch.version.cuda else "train_memory_mb_cpu"
    _remeasures(catalogue, bench, tier, sys.executable, column)


def test_rewriting_one_build_keeps_the_other_builds_columns(tmp_path, monkeypatch, catalogue, bench):
    """A --memory-only run of the CPU build alone must leave the CUDA columns and the throughput as they were."""
    monkeypatch.setattr(bench, "list_tiers", lambda: list(catalogue["tiers"]))  # not this process's test tiers
    path = tmp_path / "tiers.yaml"
    path.write_text(CATALOGUE.read_text())
    measured = {"cnn3": {"params": 10350, "train_mflops_per_sample": 2.5743, "opt_in": False, "skipped": [],
                         "memory": {"cpu": {"train_memory_mb": 1.234}}},
                "resnet18": {"params": 11173998, "train_mflops_per_sample": 833.2677, "opt_in": True,
                             "skipped": ["cpu"], "memory": {}}}
    bench.check_completable(path, ["cnn3", "resnet18"], ["cpu"], timed=False)
    written = bench.write_catalogue(path, measured, {"cpu": 123.0}, {"cpu": "9.9.9+cpu (CPU build)"}, "2030-01-01",
                                    None)
    again = yaml.safe_load(path.read_text())
    assert again == written and path.read_text().startswith("# Tier catalogue")
    assert again["runtime_memory_mb_cpu"] == 123.0 and again["runtime_memory_mb"] == catalogue["runtime_memory_mb"]
    assert again["torch_cpu"].startswith("9.9.9") and again["torch"] == catalogue["torch"]
    assert again["measured"] == catalogue["measured"] and again["memory_measured"] == "2030-01-01"
    cnn3 = again["tiers"]["cnn3"]
    assert cnn3["train_memory_mb_cpu"] == 1.23
    for kept in ("train_memory_mb", "train_samples_per_s"):
        assert cnn3[kept] == catalogue["tiers"]["cnn3"][kept], kept
    # Skipped (no torchvision there): the figure already in the file, measured or null, stays.
    assert again["tiers"]["resnet18"]["train_memory_mb_cpu"] == catalogue["tiers"]["resnet18"]["train_memory_mb_cpu"]
    # A file from before the _cpu columns cannot be completed by a CUDA-only run: refused before measuring.
    old = {k: v for k, v in catalogue.items() if k != "runtime_memory_mb_cpu"}
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(SystemExit, match="lacks runtime_memory_mb_cpu, which this run would not measure"):
        bench.check_completable(path, ["cnn3"], ["cuda"], timed=True)
