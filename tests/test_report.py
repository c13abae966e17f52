"""`gefl report`: the figures and the page of real runs (made by the simulator, kept short), the
comparison of two runs, and the clear errors on what is not a run directory."""

from __future__ import annotations

import functools
import html
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gefl import simulate
from gefl.data import FASHION_CLASSES, load_raw, register_dataset
from gefl.errors import GeflError
from gefl.report import (
    CONTRIBUTED,
    DPI,
    FIGURE_SIZES,
    LATE,
    NOT_SAMPLED,
    participation,
    read_run,
    write_comparison,
    write_report,
)
from gefl.samples import GAP, LABEL_WIDTH

from netutil import fast_slow_mix

SLICE = "fashion-mnist-slice"
"""The real Fashion-MNIST, its first 2,000 training and 1,000 test images: a run evaluates on 1,000
images instead of 10,000 (the runs' time is mostly evaluation), and 100 per class remain for samples."""


@functools.cache
def _slice(data_dir: Path | None) -> tuple:
    raw = load_raw("fashion-mnist", data_dir)
    return raw.train_x[:2000], raw.train_y[:2000], raw.test_x[:1000], raw.test_y[:1000]


register_dataset(SLICE, FASHION_CLASSES, _slice)

SHORT = {"dataset": SLICE, "num_clients": 3, "tiers": ["cnn2", "cnn3"], "rounds": 2, "workers": 1, "device": "cpu",
         "train": {"local_epochs": 1},
         "partition": {"samples_per_client": 100}, "eval": {"every": 1},
         "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {"local_epochs": 1}}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _simulate(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: dict) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    with pytest.MonkeyPatch.context() as mp:  # the session's no-download rule, for a module-scoped run
        mp.setenv("GEFL_NO_DOWNLOAD", "1")
        simulate(cfg, out=out)
    return out


@pytest.fixture(scope="module")
def gefl_f_run(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory, "geflf", SHORT)


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory, "fedavg", {**SHORT, "algorithm": "fedavg"})


@pytest.fixture(scope="module")
def devices_run(tmp_path_factory) -> Path:
    mix = fast_slow_mix(tmp_path_factory.mktemp("mix") / "mix.yaml")
    return _simulate(tmp_path_factory, "devices", {**SHORT, "algorithm": "fedavg", "tiers": ["cnn3c", "cnn5"],
                                                   "devices": str(mix)})


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking it is a PNG at all."""
    data = path.read_bytes()
    assert len(data) > 100, f"{path} is nearly empty"
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _expected(name: str) -> tuple[int, int]:
    width, height = FIGURE_SIZES[name]
    return round(width * DPI), round(height * DPI)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_page(index: Path, figures: set[str]) -> str:
    """Every expected figure is there, a real PNG of its size, and the page shows each PNG written."""
    out = index.parent
    page = index.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert 'src="http' not in page and 'href="http' not in page  # opens from disk, offline
    written = {p.name for p in out.glob("*.png")}
    assert written == figures, f"figures {sorted(written)}, expected {sorted(figures)}"
    for name in written:
        size = _png_size(out / name)
        if name in FIGURE_SIZES:
            assert size == _expected(name), f"{name} is {size}, expected {_expected(name)}"
        assert f'src="{name}"' in page, f"index.html does not show {name}"
    return page


def _check_summary(page: str, run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['mean_best_acc']:.2f}" in page and f"{summary['mean_final_acc']:.2f}" in page
    for tier, s in summary["tiers"].items():
        assert f"<td class=\"l\">{tier}</td><td>{s['params']:,}</td><td>{s['best_acc']:.2f}</td>" \
               f"<td>{s['final_acc']:.2f}</td>" in page
    assert f"{summary['wall_time_s']:.1f} s" in page
    assert summary["algorithm"] in page and summary["dataset"] in page
    assert f"<pre>{html.escape((run / 'config.yaml').read_text())}</pre>" in page


def test_a_gefl_f_run_gets_accuracy_loss_traffic_participation_and_samples(gefl_f_run):
    index = write_report(gefl_f_run)
    assert index == gefl_f_run / "report" / "index.html"
    page = _check_page(index, {"accuracy.png", "loss.png", "bytes.png", "participation.png", "samples.png"})
    _check_summary(page, gefl_f_run)
    # the sample grid is `gefl samples`' picture: per class, 8 generated and 8 real 32x32 tiles
    tiles = 8 * (32 + 2) + 2
    assert _png_size(gefl_f_run / "report" / "samples.png") == (LABEL_WIDTH + 2 * tiles + GAP, 10 * 34 + 2 + 16)
    phases = {r["phase"] for r in _records(gefl_f_run)}
    assert phases == {"warmup", "generator", "head"}
    assert "Every participant contributed to every round." in page  # in-process clients never fail
    assert "algorithm: gefl-f" in page  # the config, as the run wrote it


def test_a_devices_run_shows_the_clock_and_its_stragglers_by_device_class(devices_run, tmp_path):
    index = write_report(devices_run, tmp_path / "elsewhere")
    assert index == tmp_path / "elsewhere" / "index.html"
    page = _check_page(index, {"accuracy.png", "loss.png", "bytes.png", "devices.png", "participation.png"})
    _check_summary(page, devices_run)
    records = _records(devices_run)
    late = [(r["round"], c) for r in records for c in r["stragglers"]]
    assert late, "the slow device should miss the 1 s deadline"
    slow = {p["client"] for p in json.loads((devices_run / "partition.json").read_text()) if p["device"] == "slow"}
    assert {c for _, c in late} == slow
    clients, rounds, grid, missing = participation(read_run(devices_run))
    assert rounds == [r["round"] for r in records] and clients == [0, 1, 2]
    for j, r in enumerate(records):
        for c in clients:
            want = LATE if c in r["stragglers"] else CONTRIBUTED if c in r.get("contributors", []) else NOT_SAMPLED
            assert grid[clients.index(c)][j] == want, (r, c)
    assert [(m["round"], m["client"]) for m in missing] == late
    for round_number, client in late:  # the table names each non-contribution and its reason
        assert f"<tr><td class=\"l\">{round_number}</td><td class=\"l\">train</td><td class=\"l\">{client}</td>" \
               f"<td class=\"l\">slow</td><td class=\"l\">late</td><td class=\"l\">late: its result came after " \
               f"the simulated deadline of 1 s" in page
    assert "<td class=\"l\">slow</td>" in page  # the device summary table


def test_a_fedavg_run_and_the_comparison_of_two_runs(fedavg_run, gefl_f_run, tmp_path):
    page = _check_page(write_report(fedavg_run), {"accuracy.png", "loss.png", "bytes.png", "participation.png"})
    _check_summary(page, fedavg_run)
    clients, rounds, grid, missing = participation(read_run(fedavg_run))
    assert clients == [0, 1, 2] and rounds == [1, 2] and not missing
    assert all(state == CONTRIBUTED for row in grid for state in row)

    index = write_comparison([gefl_f_run, fedavg_run], tmp_path / "cmp")
    page = _check_page(index, {"compare.png"})
    for run in (gefl_f_run, fedavg_run):
        summary = json.loads((run / "summary.json").read_text())
        total = sum(sum(r["bytes"]["down"].values()) + sum(r["bytes"]["up"].values()) for r in _records(run))
        assert total > 0
        assert f"<td class=\"l\">{run}</td><td class=\"l\">{summary['algorithm']}</td>" \
               f"<td>{summary['mean_best_acc']:.2f}</td><td>{summary['mean_final_acc']:.2f}</td>" in page
    assert page.count("<tr>") == 3  # the header and a row per run


def test_what_is_not_a_run_directory_is_named(tmp_path, fedavg_run):
    with pytest.raises(GeflError, match="is not a run directory: it has neither metrics.jsonl nor summary.json"):
        write_report(tmp_path)
    with pytest.raises(GeflError, match="is not a directory"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(GeflError, match="has no records"):
        write_report(tmp_path)

    garbled = tmp_path / "garbled"
    shutil.copytree(fedavg_run, garbled, ignore=shutil.ignore_patterns("report"))
    lines = (garbled / "metrics.jsonl").read_text().splitlines()
    (garbled / "metrics.jsonl").write_text(lines[0][:40] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(GeflError, match=r"metrics.jsonl line 1 is garbled"):
        write_report(garbled)
    with pytest.raises(GeflError, match="two or more run directories"):
        write_comparison([fedavg_run], tmp_path / "cmp")


def test_a_run_in_progress_gets_its_figures_and_says_the_summary_is_missing(tmp_path, fedavg_run):
    running = tmp_path / "running"
    shutil.copytree(fedavg_run, running, ignore=shutil.ignore_patterns("report", "summary.json", "partition.json"))
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "pha')  # the line the run is writing right now
    page = _check_page(write_report(running), {"accuracy.png", "loss.png", "bytes.png", "participation.png"})
    assert "summary.json is missing" in page and "No summary.json" in page
    assert "line 3 is incomplete" in page
    assert "fedavg" in page  # from its config.yaml


def test_the_command_line(fedavg_run, devices_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "gefl.cli", "report", str(fedavg_run)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(fedavg_run / "report" / "index.html") in done.stdout
    both = subprocess.run([sys.executable, "-m", "gefl.cli", "report", str(fedavg_run), str(devices_run)],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "needs --out DIR" in both.stderr
    bad = subprocess.run([sys.executable, "-m", "gefl.cli", "report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "is not a run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_importing_gefl_does_not_import_matplotlib():
    code = "import sys, gefl, gefl.cli, gefl.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
