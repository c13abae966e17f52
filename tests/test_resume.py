"""`gefl simulate --resume`: a run killed with SIGKILL mid-run, resumed from its checkpoint, ends
with the weights of the same run left alone, tensor for tensor (real processes, real data)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from netutil import fast_slow_mix

GEFL_F = {
    "algorithm": "gefl-f", "num_clients": 4, "tiers": ["cnn3", "cnn4"], "rounds": 2,
    "partition": {"kind": "iid", "samples_per_client": 300}, "train": {"local_epochs": 1}, "eval": {"every": 1},
    "gefl": {"warmup_rounds": 2, "generator_rounds": 2, "generator": {"local_epochs": 1}},
}


def _gefl(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gefl.cli", "simulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _rounds_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _kill_after(proc: subprocess.Popen, run: Path, rounds: int) -> None:
    """SIGKILL the run (and its worker pool) once `rounds` rounds are on disk, before it ends."""
    while _rounds_done(run) < rounds:
        assert proc.poll() is None, f"the run ended before round {rounds}: {proc.communicate()}"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed mid-run"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _comparable(run: Path) -> list[dict]:
    """Each round's record without its wall-clock seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "weights").iterdir())
    assert names == sorted(p.name for p in (b / "weights").iterdir()) and names
    for name in names:
        wa, wb = load_file(a / "weights" / name), load_file(b / "weights" / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert wa[key].dtype == wb[key].dtype and wa[key].equal(wb[key]), f"{name}: {key} differs"


@pytest.mark.parametrize("kind", ["gefl-f", "devices"])
def test_a_killed_simulation_resumes_to_the_uninterrupted_result(tmp_path, kind):
    cfg = dict(GEFL_F)
    kill_at = 3  # in the generator phase
    if kind == "devices":
        mix = fast_slow_mix(tmp_path / "mix.yaml")
        cfg = {**cfg, "algorithm": "fedavg", "tiers": ["cnn3c", "cnn5"], "rounds": 5, "devices": str(mix)}
        kill_at = 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"

    uninterrupted = _gefl("--config", str(config), "--out", str(whole))
    killed = _gefl("--config", str(config), "--out", str(stopped))
    _kill_after(killed, stopped, kill_at)
    out, err = uninterrupted.communicate()
    assert uninterrupted.returncode == 0, err
    assert not (stopped / "summary.json").exists()

    resumed = _gefl("--resume", str(stopped))
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming after round" in out
    assert "round   1/" not in out, "the resumed run started over instead of going on from its checkpoint"
    _same_weights(whole, stopped)
    assert _comparable(whole) == _comparable(stopped)
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, stopped))
    assert a["mean_best_acc"] == b["mean_best_acc"] and a["tiers"] == b["tiers"]
    if kind == "devices":
        assert a["devices"] == b["devices"] and a["devices"]["device_classes"]["slow"]["stragglers"] == 5


def test_resume_refuses_a_changed_config_by_name_and_a_directory_without_a_checkpoint(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**GEFL_F, "algorithm": "fedavg", "rounds": 1}))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "gefl.cli", "simulate", "--config", str(config), "--out", str(run)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    changed = subprocess.run([sys.executable, "-m", "gefl.cli", "simulate", "--resume", str(run), "--config",
                              str(config), "--set", "train.lr=0.5"], capture_output=True, text=True)
    assert changed.returncode == 2 and "train.lr" in changed.stderr and "Traceback" not in changed.stderr
    empty = subprocess.run([sys.executable, "-m", "gefl.cli", "simulate", "--resume", str(tmp_path)],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "checkpoint.safetensors" in empty.stderr and "Traceback" not in empty.stderr
