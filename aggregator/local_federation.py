"""`gefl simulate --transport grpc|mqtt`: a whole federation on loopback, over the real protocol.

The same config as an in-process simulation, but the aggregator serves gRPC on a free loopback
port, or bridges to a Mosquitto broker it starts on a free port (or one given with --broker),
and every client is its own `gefl client run` process reading its shard from an ImageFolder
directory (written by `gefl data split`'s code). Clients are started one after the
other, each once the previous one has registered, so client ids, tiers, shards and task seeds are
the in-process run's: the two runs compute the same rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gefl.aggregator.coordinator import Coordinator
from gefl.aggregator.grpc_server import start_server
from gefl.aggregator.serve import build_coordinator

from gefl.algorithms import make_algorithm
from gefl.config import Config
from gefl.data import load_dataset
from gefl.errors import GeflError
from gefl.image_folder import client_dir_name, write_split
from gefl.rounds.rundir import RunDir
from gefl.simulation.device_sim import simulated_devices

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 120.0


def _client_command(aggregator: str, data_dir: Path, tier: str, name: str, state_dir: Path) -> list[str]:
    """A client process; its credential goes to the run's temporary directory, not the user's state."""
    return [sys.executable, "-m", "gefl.cli", "client", "run", "--aggregator", aggregator,
            "--data-dir", str(data_dir), "--tier", tier, "--name", name, "--threads", "1", "--give-up", "60",
            "--state-dir", str(state_dir)]


def _wait_registered(coordinator: Coordinator, count: int, process: subprocess.Popen, log_file: Path) -> None:
    until = time.monotonic() + REGISTER_TIMEOUT_S
    while len(coordinator.clients) < count:
        if process.poll() is not None:
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise GeflError(f"client process {count - 1} exited with code {process.returncode} before registering; "
                            f"its log ({log_file}) ends with:\n{tail}")
        if time.monotonic() > until:
            raise GeflError(f"client {count - 1} did not register within {REGISTER_TIMEOUT_S:.0f} s; see {log_file}")
        time.sleep(0.02)


def simulate_over_network(cfg: Config, transport: str = "grpc", *, broker: str | None = None,
                          out: str | Path | None = None) -> dict:
    """transport: grpc or mqtt; `broker` (mqtt only): a broker URL to use instead of starting Mosquitto."""
    if transport not in ("grpc", "mqtt"):
        raise GeflError(f"transport {transport!r} is not a network transport: grpc or mqtt")
    if broker is not None and transport != "mqtt":
        raise GeflError("--broker is for --transport mqtt")
    RunDir.check_target(out)
    devices = simulated_devices(cfg, load_dataset(cfg.dataset, cfg.data_dir), make_algorithm(cfg))
    if devices is not None:
        cfg = dataclasses.replace(cfg, num_clients=len(devices.clients))
    run = RunDir.create(out, cfg)
    token = secrets.token_urlsafe(24)
    coordinator = build_coordinator(cfg, run.path, token, devices)
    with contextlib.ExitStack() as stack:
        if transport == "grpc":
            server, port, _ = start_server(coordinator, "127.0.0.1:0")
            stack.callback(lambda: server.stop(grace=0.5).wait())
            aggregator = f"127.0.0.1:{port}"
        else:
            from gefl.aggregator.mosquitto import Mosquitto
            from gefl.aggregator.mqtt_bridge import MqttBridge

            from gefl.protocol.mqtt import MqttAuth, parse_broker_url

            if broker is None:
                broker = stack.enter_context(Mosquitto()).url
            bridge = MqttBridge(coordinator, parse_broker_url(broker), MqttAuth())
            bridge.start()
            stack.callback(bridge.stop)
            aggregator = str(bridge.url)
        _run_clients(cfg, coordinator, run, aggregator, token, transport)
    return json.loads((run.path / "summary.json").read_text())


def _run_clients(cfg: Config, coordinator: Coordinator, run: RunDir, aggregator: str, token: str,
                 transport: str) -> None:
    logs = run.path / "clients"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    driver = threading.Thread(target=coordinator.run, name="gefl-coordinator", daemon=True)
    devices = coordinator.loop.devices if coordinator.loop is not None else None
    tier_of = devices.tier_of if devices is not None else cfg.tier_of
    with tempfile.TemporaryDirectory(prefix="gefl-shards-") as shards:
        p = cfg.partition
        write_split(cfg.dataset, cfg.num_clients, Path(shards), kind=p.kind, samples_per_client=p.samples_per_client,
                    alpha=p.alpha, shards_per_client=p.shards_per_client, seed=cfg.seed, data_dir=cfg.data_dir)
        log.info(f"gefl simulate --transport {transport}: aggregator at {aggregator}, {cfg.num_clients} client "
            f"processes; client logs in {logs}")
        env = {**os.environ, "GEFL_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        try:
            driver.start()
            for c in range(cfg.num_clients):
                name = client_dir_name(c)
                client_log = logs / f"{name}.log"
                with open(client_log, "w") as f:
                    processes.append(subprocess.Popen(
                        _client_command(aggregator, Path(shards) / name, tier_of(c), name, Path(shards) / "state"),
                        stdout=f, stderr=subprocess.STDOUT, env=env))
                _wait_registered(coordinator, c + 1, processes[-1], client_log)
            while driver.is_alive():
                driver.join(0.5)
                if all(proc.poll() is not None for proc in processes) and not coordinator.federation.finished:
                    coordinator.stopping.set()
                    raise GeflError(f"every client process exited before the last round; see the logs in {logs}")
            for proc in processes:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            coordinator.stopping.set()
            for proc in processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
