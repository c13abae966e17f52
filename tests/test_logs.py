"""Logging: every command logs through `logging` under `gefl`; the command line picks the level and
the format (plain lines, or one JSON object per line for a service's journal)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys


def _split(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gefl.cli", "data", "split", "--clients", "2",
                           "--samples-per-client", "10", "--out", str(tmp_path / "shards"), *flags],
                          capture_output=True, text=True, env={**os.environ, "GEFL_NO_DOWNLOAD": "1"})


def test_progress_lines_by_default_none_with_quiet_and_json_lines_on_request(tmp_path):
    plain = _split(tmp_path / "a")
    assert plain.returncode == 0, plain.stderr
    assert "gefl data split: fashion-mnist, 2 clients" in plain.stdout

    quiet = _split(tmp_path / "b", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == ""

    lines = _split(tmp_path / "c", "--log-format", "json")
    assert lines.returncode == 0, lines.stderr
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert records and all(r.keys() >= {"time", "level", "logger", "message"} for r in records)
    assert records[0]["level"] == "info" and records[0]["logger"] == "gefl.image_folder"
    assert records[0]["message"].startswith("gefl data split: fashion-mnist, 2 clients")


def test_the_library_is_silent_below_warnings_until_configured(tmp_path):
    """A script that imports gefl and configures nothing sees no progress lines, only warnings."""
    code = ("import gefl.image_folder as f; import logging; "
            f"f.write_split('fashion-mnist', 2, {str(tmp_path / 'x')!r}, samples_per_client=10); "
            "logging.getLogger('gefl.test').warning('a warning')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "GEFL_NO_DOWNLOAD": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr.strip() == "a warning"


def test_json_lines_carry_the_level_and_exception():
    from gefl.logs import JsonLines

    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("gefl.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info())
    line = json.loads(JsonLines().format(record))
    assert line["level"] == "error" and line["message"] == "failed: it" and "ValueError: bad" in line["exception"]


def test_tensorboard_events_hold_each_rounds_accuracy(tmp_path):
    """--tensorboard DIR: the scalars read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run([sys.executable, "-m", "gefl.cli", "simulate", "--set", "algorithm=fedavg", "--set",
                           "num_clients=2", "--set", "tiers=[cnn2,cnn3]", "--set", "rounds=2", "--set",
                           "partition.samples_per_client=50", "--set", "eval.every=1", "--out", str(tmp_path / "run"),
                           "--tensorboard", str(tmp_path / "tb"), "-q"],
                          capture_output=True, text=True, env={**os.environ, "GEFL_NO_DOWNLOAD": "1"})
    assert done.returncode == 0, done.stderr
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"accuracy/mean", "accuracy/cnn2", "accuracy/cnn3", "loss", "bytes_per_client/down"} <= tags, tags
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mean = [(e.step, round(e.value, 4)) for e in events.Scalars("accuracy/mean")]
    assert mean == [(m["round"], round(m["mean_accuracy"], 4)) for m in metrics]
