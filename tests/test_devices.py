"""Tier selection by device capability, the device profiles, `gefl probe`, and simulated device mixes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from gefl import simulate
from gefl.errors import GeflError
from gefl.tiers.devices import (
    DEVICES_PATH,
    Catalogue,
    Policy,
    TierCost,
    load_catalogue,
    load_mix,
    load_profiles,
    select_tier,
)
from gefl.tiers.models import PAPER_TIERS

from netutil import fast_slow_mix

REPO = Path(__file__).resolve().parent.parent

# A small catalogue with round numbers, so every expectation below can be checked by hand: the CUDA build's
# figures (runtime 100 MB) first, the CPU-only build's (runtime 40 MB) last.
TOY = Catalogue("small", runtime_memory_mb=100.0, runtime_memory_mb_cpu=40.0, tiers={
    "small": TierCost("small", 1_000, 1.0, 10.0, train_memory_mb_cpu=10.0),
    "medium": TierCost("medium", 10_000, 2.0, 50.0, train_memory_mb_cpu=45.0),
    "large": TierCost("large", 100_000, 5.0, 400.0, train_memory_mb_cpu=None),  # unmeasured: the CUDA figure
})
HALF = Policy(None, 1000, memory_fraction=0.5)
"""The toy tests' policy: no deadline, half the available memory (their figures assume it)."""
HALF_25S = Policy(deadline_s=25, samples_per_round=1000, memory_fraction=0.5)


def test_policy_picks_the_largest_tier_that_fits_and_names_the_runner_up():
    # 1000 samples at 100 samples/s on the reference tier: small 10 s, medium 20 s, large 50 s.
    policy = HALF_25S
    choice = select_tier(["small", "medium", "large"], 2000, 100, policy, TOY, cuda=True)
    assert choice.tier == "medium" and choice.meets_deadline
    assert choice.round_time_s == pytest.approx(20.0)
    assert "large would need 50.0 s > 25 s deadline" in choice.reason
    # Without a deadline, memory alone decides: large needs 500 MB of the 1000 MB allowed.
    assert select_tier(["small", "medium", "large"], 2000, 100, HALF, TOY, cuda=True).tier == "large"
    # Memory: 700 MB available, half of it allowed: large (500 MB) is refused, with the figures.
    choice = select_tier(["small", "medium", "large"], 700, 1000, HALF, TOY, cuda=True)
    assert choice.tier == "medium" and "large would need 500 MB > 350 MB (50% of 700 MB available)" in choice.reason
    assert "CUDA build of torch" in choice.reason


def test_policy_when_nothing_meets_the_deadline_or_fits_in_memory():
    slow = select_tier(["small", "medium", "large"], 2000, 10, HALF_25S, TOY,
                       cuda=True)
    assert slow.tier == "small" and not slow.meets_deadline and "straggle" in slow.reason
    with pytest.raises(GeflError, match="no tier fits this device's memory: the smallest, small, would need 110 MB"):
        select_tier(["small", "medium", "large"], 200, 100, HALF, TOY, cuda=True)


def test_a_device_without_cuda_is_charged_the_cpu_builds_figures():
    assert TOY.memory_mb("small", cuda=True) == 110.0 and TOY.memory_mb("small", cuda=False) == 50.0
    assert TOY.memory_mb("medium", cuda=False) == 85.0
    # A tier the CPU build could not measure is charged the CUDA build's training figure on the CPU runtime.
    assert TOY.memory_mb("large", cuda=False) == 440.0
    # 200 MB available, 100 MB allowed: the CUDA figures fit nothing, the CPU figures fit medium (85 MB).
    with pytest.raises(GeflError, match="would need 110 MB .*figures for the CUDA build of torch"):
        select_tier(["small", "medium", "large"], 200, 100, HALF, TOY, cuda=True)
    choice = select_tier(["small", "medium", "large"], 200, 100, HALF, TOY, cuda=False)
    assert choice.tier == "medium" and choice.memory_mb == 85.0 and "CPU-only build of torch" in choice.reason
    assert "large would need 440 MB > 100 MB" in choice.reason


def test_the_catalogue_has_every_paper_tier():
    catalogue = load_catalogue()
    assert set(PAPER_TIERS) <= set(catalogue.tiers)
    assert catalogue.reference_tier in catalogue.tiers and catalogue.runtime_memory_mb > 0


def test_every_device_profile_gets_its_documented_tier():
    profiles, policy = load_profiles(DEVICES_PATH)
    catalogue = load_catalogue()
    assert set(profiles) >= {"rpi-zero-2w", "rpi-4", "rpi-5", "jetson-nano", "jetson-orin-nano", "desktop-gpu"}
    for name, profile in profiles.items():
        if profile.expected_tier is None:
            with pytest.raises(GeflError, match="no tier fits this device's memory"):
                select_tier(list(catalogue.tiers), profile.memory_available_mb, profile.train_samples_per_s, policy,
                            catalogue, profile.bandwidth_mbps, cuda=profile.cuda)
            continue
        choice = select_tier(list(catalogue.tiers), profile.memory_available_mb, profile.train_samples_per_s, policy,
                             catalogue, profile.bandwidth_mbps, cuda=profile.cuda)
        assert choice.tier == profile.expected_tier, (name, choice.reason)


def test_the_pi_zero_2w_is_judged_by_the_cpu_build_it_runs():
    """A Pi only ever runs the CPU-only torch (PyPI's aarch64 wheel): its figures, not the CUDA build's."""
    profiles, policy = load_profiles(DEVICES_PATH)
    catalogue = load_catalogue()
    zero = profiles["rpi-zero-2w"]
    assert not zero.cuda and zero.memory_total_mb == 512
    smallest = min(catalogue.tiers, key=lambda t: catalogue.memory_mb(t, cuda=False))
    cpu_need, cuda_need = catalogue.memory_mb(smallest, cuda=False), catalogue.memory_mb(smallest, cuda=True)
    # The CUDA build's runtime alone exceeds all of the Zero's available memory; the CPU build's fits in it.
    assert catalogue.runtime_memory_mb_cpu < catalogue.runtime_memory_mb
    assert cuda_need > zero.memory_available_mb > cpu_need
    whole = Policy(policy.deadline_s, policy.samples_per_round, memory_fraction=1.0)

    def choose(cuda: bool, p: Policy = whole):
        return select_tier(list(catalogue.tiers), zero.memory_available_mb, zero.train_samples_per_s, p, catalogue,
                           zero.bandwidth_mbps, cuda=cuda)

    with pytest.raises(GeflError, match="no tier fits this device's memory"):
        choose(cuda=True)
    choice = choose(cuda=False)  # allowed all of its available memory, the CPU figures give it a tier
    assert choice.tier in catalogue.tiers and choice.memory_mb <= zero.memory_available_mb
    # Under the shipped policy (80 % of the available memory) too: the smallest tiers fit, the
    # larger ones do not, and it gets the one the devices file documents.
    assert cpu_need <= policy.memory_fraction * zero.memory_available_mb < cuda_need
    assert choose(cuda=False, p=policy).tier == zero.expected_tier == "cnn2"
    with pytest.raises(GeflError, match="no tier fits this device's memory"):
        choose(cuda=True, p=policy)


def test_a_catalogue_without_the_cpu_build_columns_says_how_to_regenerate_it(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "tiers.yaml").read_text())
    old = {k: v for k, v in data.items() if k != "runtime_memory_mb_cpu"}
    old["tiers"] = {t: {k: v for k, v in row.items() if k != "train_memory_mb_cpu"} for t, row in data["tiers"].items()}
    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(GeflError, match=r"lacks runtime_memory_mb_cpu, cnn2.train_memory_mb_cpu.*"
                                        r"benchmarks/tiers.py --python CPU-VENV/bin/python"):
        load_catalogue(path)
    data["tiers"]["cnn3"]["train_memory_mb_cpu"] = "lots"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GeflError, match="malformed .*regenerate it"):
        load_catalogue(path)


def test_devices_files_are_checked(tmp_path):
    cases = {
        "mix: {rpi-9: 2}": "unknown device profile 'rpi-9'",
        "mix: {rpi-4: 0}": "positive whole count for 'rpi-4'",
        "profiles: {x: {memory_available_mb: 100}}\nmix: {x: 1}": "profile 'x' lacks 'train_samples_per_s'",
        "mix: '2 rpi-4'": "write it as '3 x rpi-4'",
        "mixes: {rpi-4: 1}": "unknown keys \\['mixes'\\]",
        "mix: [": "not valid YAML",
        "policy: {deadline_s: soon}\nmix: {rpi-4: 1}": "deadline_s must be a positive number of seconds",
        "policy: {memory_fraction: 1.5}\nmix: {rpi-4: 1}": "memory_fraction must be in \\(0, 1\\]",
    }
    for text, message in cases.items():
        path = tmp_path / "devices.yaml"
        path.write_text(text)
        with pytest.raises(GeflError, match=message):
            load_mix(path)
    path.write_text("mix: '3 x rpi-4, 1 x desktop-gpu'")
    assert [p.name for p in load_mix(path)[0]] == ["rpi-4"] * 3 + ["desktop-gpu"]


def fake_tree(root: Path, model: str, mem_kb: int, cpus: int) -> Path:
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    (root / "proc" / "meminfo").write_text(f"MemTotal: {mem_kb} kB\nMemFree: {mem_kb // 2} kB\n"
                                           f"MemAvailable: {mem_kb * 3 // 4} kB\n")
    (root / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n\n" for i in range(cpus)))
    return root


def probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gefl.cli", "probe", *args], capture_output=True, text=True)


def test_gefl_probe_json_follows_the_schema_and_explains_its_choice(tmp_path):
    schema = json.loads((REPO / "configs" / "schemas" / "probe.schema.json").read_text())
    root = fake_tree(tmp_path / "pi", "Raspberry Pi 4 Model B Rev 1.4", 3_884_000, 4)
    result = probe_cli("--json", "--root", str(root))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema)
    assert report["board_family"] == "raspberry-pi" and report["cpu_count"] == 4
    assert report["tier"] in load_catalogue().tiers and report["reason"].startswith(report["tier"])
    here = probe_cli()
    assert here.returncode == 0, here.stderr
    assert "tier" in here.stdout and "samples/s" in here.stdout


def test_gefl_probe_refuses_a_nonsense_policy():
    result = probe_cli("--memory-fraction", "-1")
    assert result.returncode == 2 and "memory_fraction must be in (0, 1]" in result.stderr


def test_gefl_probe_on_a_board_too_small_for_any_tier(tmp_path):
    # A Pi Zero 2 W with 417 MB available trains on the CPU build; with 195 MB (other work running) it cannot.
    roomy = probe_cli("--root", str(fake_tree(tmp_path / "zero", "Raspberry Pi Zero 2 W Rev 1.0", 427_000, 4)),
                      "--json")
    assert roomy.returncode == 0, roomy.stderr
    assert "(CPU-only build of torch)" in json.loads(roomy.stdout)["reason"]
    root = fake_tree(tmp_path / "busy-zero", "Raspberry Pi Zero 2 W Rev 1.0", 200_000, 4)
    result = probe_cli("--root", str(root))
    assert result.returncode == 2
    assert "no tier fits this device's memory" in result.stderr and "Traceback" not in result.stderr


def test_a_simulated_device_mix_picks_tiers_and_counts_stragglers(tmp_path):
    devices = fast_slow_mix(tmp_path / "mix.yaml")
    summary = simulate({"algorithm": "fedavg", "tiers": ["cnn3c", "cnn5"], "rounds": 2, "devices": str(devices),
                        "partition": {"samples_per_client": 500}, "train": {"local_epochs": 2},
                        "eval": {"every": 1}}, out=tmp_path / "run")
    assert summary["num_clients"] == 3
    classes = summary["devices"]["device_classes"]
    assert classes["fast"]["tiers"] == ["cnn5"] and classes["slow"]["tiers"] == ["cnn3c"]
    assert classes["slow"]["stragglers"] == 2 and classes["fast"]["stragglers"] == 0
    assert classes["slow"]["median_round_s"] > 1.0 > classes["fast"]["median_round_s"]
    assert set(summary["tiers"]) == {"cnn5", "cnn3c"}
    # The fast clients' updates were aggregated; every slow update was dropped, so cnn3c never moved.
    assert summary["tiers"]["cnn5"]["best_acc"] > 50
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["stragglers"] == [2] and m["simulated_s"] == 1.0 for m in metrics)
    assert len({m["accuracy"]["cnn3c"] for m in metrics}) == 1 < len({m["accuracy"]["cnn5"] for m in metrics})
    clients = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert [c["device"] for c in clients] == ["fast", "fast", "slow"] and "straggle" in clients[2]["tier_reason"]


def test_the_shipped_mix_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gefl.cli", "simulate", "--config", str(REPO / "configs" / "quickstart.yaml"),
         "--devices", str(DEVICES_PATH), "--set", "algorithm=fedavg", "--set", "rounds=1",
         "--set", "partition.samples_per_client=100", "--set", "train.local_epochs=1", "--out", str(tmp_path / "r")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert set(summary["devices"]["device_classes"]) == {"rpi-4", "jetson-orin-nano", "desktop-gpu"}
    assert summary["num_clients"] == 6 and "simulated devices" in result.stdout
