"""configs/tiers.yaml, the tier catalogue, must describe the tiers that exist, as they are now.

benchmarks/tiers.py writes it and the device policy refuses tiers on its figures, so a stale
catalogue (a tier added, a head changed) or an irreproducible memory figure would silently send
devices the wrong tier.
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
import yaml

from gefl.models import OPT_IN_TIERS, count_parameters, get_model

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
    """gefl.models.list_tiers() of a fresh process: tests (and the README's example) register tiers
    of their own in this one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "import json; from gefl.models import list_tiers; print(json.dumps(list_tiers()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def test_catalogue_lists_exactly_the_registered_tiers_with_positive_columns(catalogue):
    assert CATALOGUE.read_text().startswith("# Tier catalogue") and "benchmarks/tiers.py" in CATALOGUE.read_text()
    assert catalogue["reference_tier"] == "cnn3" and catalogue["batch_size"] == 64
    assert catalogue["runtime_memory_mb"] > 0 and catalogue["machine"]
    assert list(catalogue["tiers"]) == _registered_tiers()
    for tier, row in catalogue["tiers"].items():
        for column in COLUMNS:
            assert isinstance(row[column], int | float) and row[column] > 0, (tier, column, row.get(column))
        assert row["opt_in"] is (tier in OPT_IN_TIERS), tier


def test_catalogue_params_are_the_models_and_flops_grow_with_them(catalogue):
    rows = catalogue["tiers"]
    for tier, row in rows.items():
        assert row["params"] == count_parameters(get_model(tier)), tier
    assert rows["resnet18"]["train_mflops_per_sample"] > rows["cnn5"]["train_mflops_per_sample"]
    assert rows["cnn5"]["train_mflops_per_sample"] > rows["cnn3"]["train_mflops_per_sample"]


@pytest.mark.parametrize("tier", ["cnn3", "cnn5"])
def test_train_memory_remeasures_within_tolerance(catalogue, bench, tier):
    listed = catalogue["tiers"][tier]["train_memory_mb"]
    now = bench.measure_train_memory(tier, runs=1)
    assert abs(now - listed) <= max(0.2 * listed, 2.0), f"{tier}: {now:.2f} MB now, {listed:.2f} MB in the catalogue"
