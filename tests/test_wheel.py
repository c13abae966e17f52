"""The package as a user gets it: the wheel built from this checkout, installed (not editable) into
a fresh virtualenv, and run from a directory that holds no checkout.

The new environment takes its dependencies (torch and the rest) from the test's own environment
through a path entry, so nothing is downloaded; gefl-edge itself comes only from the wheel. A path
entry is not a site directory, so the editable install's finder in the test's environment is not
loaded there and cannot hide a file the wheel forgot.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from netutil import TOKEN, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (tracked, or new and not ignored), as a clean clone
    would build it: an in-tree build would reuse build/ from earlier builds, stale files included."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, cwd=out)
    (found,) = out.glob("gefl_edge-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """bin/ of a fresh virtualenv with the wheel installed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], check=True)
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH and the like from the test run must not reach into the checkout.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(bin_dir / "gefl"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=900)


def test_the_wheel_holds_one_import_name_and_the_shipped_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"gefl"}  # no top-level export/, protos/, aggregator/ to collide with other distributions
    for shipped in ("gefl/configs/quickstart.yaml", "gefl/configs/tiers.yaml", "gefl/configs/devices.yaml",
                    "gefl/configs/paper/fmnist-gefl-f-light.yaml", "gefl/configs/schemas/probe.schema.json",
                    "gefl/configs/mosquitto/mosquitto.conf", "gefl/configs/mosquitto/acl",
                    "gefl/configs/systemd/gefl-client.service", "gefl/configs/systemd/client.env",
                    "gefl/protos/gefl_v1.proto", "gefl/export/infer.py", "gefl/edge_client/runtime.py",
                    "gefl/aggregator/coordinator.py"):
        assert shipped in names, shipped


def test_the_installed_wheel_prints_the_systemd_unit_a_board_installs(installed, tmp_path):
    """`gefl client service > /etc/systemd/system/gefl-client.service` works for a wheel user."""
    gefl = str(installed / "gefl")
    unit = _run(installed, tmp_path, "client", "service", "--gefl-path", gefl)
    assert unit.returncode == 0, unit.stderr
    shipped = (REPO / "configs" / "systemd" / "gefl-client.service").read_text()
    assert unit.stdout == shipped.replace("\nExecStart=/opt/gefl/venv/bin/gefl ", f"\nExecStart={gefl} ")
    assert f"ExecStart={gefl} client run " in unit.stdout
    env = _run(installed, tmp_path, "client", "service", "--env")
    assert env.returncode == 0 and env.stdout == (REPO / "configs" / "systemd" / "client.env").read_text()


def test_the_installed_wheel_probes_simulates_and_serves_outside_any_checkout(installed, tmp_path):
    where = _run(installed, tmp_path, "--help")
    assert where.returncode == 0, where.stderr
    origin = subprocess.run([str(installed / "python"), "-c", "import gefl; print(gefl.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(origin).is_relative_to(installed.parent) and not Path(origin).is_relative_to(REPO)

    probe = _run(installed, tmp_path, "probe", "--json")
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["arch"] == platform.machine() and report["tier"] and report["reason"]

    # The default config, and a shipped one by name, with no configs/ folder in sight.
    short = ["--set", "algorithm=fedavg", "--set", "num_clients=2", "--set", "tiers=[cnn2,cnn3]", "--set", "rounds=1",
             "--set", "partition.samples_per_client=50", "--set", "workers=1"]
    sim = _run(installed, tmp_path, "simulate", *short, "--out", str(tmp_path / "run"))
    assert sim.returncode == 0, sim.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "fedavg" and set(summary["tiers"]) == {"cnn2", "cnn3"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_clients"] == 2
    paper = _run(installed, tmp_path, "simulate", "--config", "paper/fmnist-fedavg.yaml", *short,
                 "--out", str(tmp_path / "paper"))
    assert paper.returncode == 0, paper.stderr
    missing = _run(installed, tmp_path, "simulate", "--config", "no-such-config.yaml")
    assert missing.returncode == 2 and "paper/fmnist-fedavg.yaml" in missing.stderr  # names the shipped ones

    # The aggregator starts (it reads the tier catalogue and device profiles) and serves.
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    server = subprocess.Popen([str(installed / "gefl"), "aggregator", "serve", "--state-dir", str(tmp_path / "state"),
                               "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**clean, "GEFL_TOKEN": TOKEN})
    try:
        lines: list[str] = []

        def serving() -> bool:
            assert server.poll() is None, "".join(lines) + server.stdout.read()
            lines.append(server.stdout.readline())
            return "serving gRPC on 127.0.0.1" in lines[-1]

        wait_for(serving, 300, "the aggregator to serve")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
