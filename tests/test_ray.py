"""executor: ray on a real two-node Ray cluster on this machine, started and stopped here.

The head and the second node are two `ray start --block` processes, each with one CPU, so the run's
two client actors sit one on each node. The cluster checks a token (`RAY_AUTH_MODE=token`) that is
written to a file and reaches every Ray process by the environment, never by a command line.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from gefl.config import config_from_dict
from gefl.errors import GeflError

from netutil import Process, free_port, read_metrics, wait_for

RUN = {"num_clients": 3, "tiers": ["cnn2", "cnn3", "cnn4"], "rounds": 3, "algorithm": "gefl-f",
       "partition": {"samples_per_client": 200}, "train": {"local_epochs": 1}, "eval": {"every": 1},
       "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {"preset": "light", "local_epochs": 1}}}
"""A GeFL-F run through its three phases (warm-up, generator, head) with the lightweight generator."""


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    temp_dir: Path


def _ray_ports() -> list[str]:
    """Free ports for what a node would otherwise put on fixed ones (two nodes on one machine, and other tests)."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def _ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Every process of this cluster: the nodes' own, and the workers they started (by the session folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            words = proc.info["cmdline"] or []
            env = proc.info["environ"] or {}
        except (psutil.Error, KeyError):
            continue
        if any(str(temp_dir) in w for w in words) or env.get("RAY_AUTH_TOKEN_PATH", "").startswith(str(temp_dir)):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short folder: Ray's sockets live under it, and a Unix socket path has at most 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    token = temp_dir / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    nodes = [subprocess.Popen(
        [ray, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         "--ray-client-server-port", str(free_port()), *common, *_ray_ports()],
        env=env, stdout=(temp_dir / "head.log").open("w"), stderr=subprocess.STDOUT)]
    address = f"127.0.0.1:{port}"
    try:
        nodes.append(subprocess.Popen(
            [ray, "start", f"--address={address}", '--resources={"second": 1}', *common, *_ray_ports()],
            env=env, stdout=(temp_dir / "second.log").open("w"), stderr=subprocess.STDOUT))
        # Both nodes up and each with its CPU, seen by a driver as gefl's will see them.
        probe = (f"import ray, time\nray.init(address={address!r}, logging_level='ERROR')\n"
                 "for _ in range(600):\n"
                 "    if sum(n['Alive'] for n in ray.nodes()) == 2 and ray.cluster_resources().get('CPU') == 2: break\n"
                 "    time.sleep(0.1)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources().get('CPU'))\n")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
        assert out.stdout.split() == ["2", "2.0"], f"the two-node cluster did not come up:\n{out.stdout}{out.stderr}"
        yield Cluster(address, env, temp_dir)
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(90)
            except subprocess.TimeoutExpired:
                node.kill()
        for proc in _ray_processes(temp_dir):  # nothing should be left; if it is, it must not outlive the test
            proc.kill()


def _simulate(config: Path, out: Path, *sets: str, env: dict[str, str] | None = None) -> Process:
    return Process(["simulate", "-q", "--config", str(config), "--out", str(out), "--set", "workers=2",
                    *(a for s in sets for a in ("--set", s))], env=env)


def _weights(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "weights").glob("*.safetensors"))}


def test_ray_cluster_gives_the_local_pools_weights(cluster: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN))
    local = _simulate(config, tmp_path / "local", "executor=local")
    assert local.wait(600) == 0, local.output
    on_ray = _simulate(config, tmp_path / "ray", "executor=ray", f"ray.address={cluster.address}", env=cluster.env)
    assert on_ray.wait(600) == 0, on_ray.output

    weights = _weights(tmp_path / "local")
    assert set(weights) == {"cnn2.safetensors", "cnn3.safetensors", "cnn4.safetensors", "generator.safetensors"}
    assert weights == _weights(tmp_path / "ray"), "the Ray cluster's run trained other weights than the local pool"
    ray_summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert ray_summary["tiers"] == json.loads((tmp_path / "local" / "summary.json").read_text())["tiers"]
    # The token never shows in what the run prints or writes.
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert token not in on_ray.output
    assert not any(token in p.read_text(errors="replace") for p in (tmp_path / "ray").rglob("*") if p.is_file()
                   and p.suffix in {".json", ".jsonl", ".yaml", ".log"})


def _client_actors(cluster: Cluster) -> list[psutil.Process]:
    """This cluster's client actor processes (Ray titles each `ray::_ClientActor`, `.run` while training)."""
    return [p for p in _ray_processes(cluster.temp_dir)
            if (p.info["cmdline"] or [""])[0].startswith("ray::_ClientActor")]


def test_actor_killed_mid_run_counts_as_a_dropped_client(cluster: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    # Ten head rounds, evaluated at the first and the last: a killed actor's next call is a training task.
    config.write_text(yaml.safe_dump({**RUN, "rounds": 10, "eval": {"every": 100}}))
    run = _simulate(config, tmp_path / "run", "executor=ray", f"ray.address={cluster.address}", env=cluster.env)
    try:
        wait_for(lambda: len(read_metrics(tmp_path / "run")) >= 1 or run.proc.poll() is not None, 300,
                 "the first round's record")
        wait_for(lambda: len(_client_actors(cluster)) == 2 or run.proc.poll() is not None, 60, "two client actors")
        assert run.proc.poll() is None, f"the run ended before an actor could be killed:\n{run.output}"
        victim = _client_actors(cluster)[0]
        victim.send_signal(signal.SIGKILL)
        assert run.wait(600) == 0, run.output
    finally:
        run.kill()

    assert "died" in run.output, run.output
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == list(range(1, 13)), "a round is missing after the actor's death"
    dropped = [c for r in records for c in r.get("dropped", [])]
    assert dropped or "evaluation" in run.output, f"no client was dropped nor an evaluation run again:\n{run.output}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["tiers"]) == {"cnn2", "cnn3", "cnn4"}
    assert len(_weights(tmp_path / "run")) == 4


def test_executor_names_are_checked() -> None:
    with pytest.raises(GeflError, match="executor"):
        config_from_dict({"executor": "slurm"})
    with pytest.raises(GeflError, match="ray.cpus"):
        config_from_dict({"executor": "ray", "ray": {"cpus": 0}})
    with pytest.raises(GeflError, match="ray.gpus"):
        config_from_dict({"executor": "ray", "device": "cuda", "ray": {"gpus": 0}})
    with pytest.raises(GeflError, match="HOST:PORT"):
        config_from_dict({"executor": "ray", "ray": {"address": "head-without-port"}})


def test_without_ray_installed_the_error_says_how_to_get_it() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "from gefl.simulation.ray_executor import RayExecutor\n"
            "from gefl.schema import RayConfig\n"
            "from gefl.errors import GeflError\n"
            "try:\n    RayExecutor(None, RayConfig(), None, 3)\n"
            "except GeflError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'gefl-edge[ray]'" in out.stdout, out.stdout + out.stderr


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**RUN, "rounds": 2}))
    run = _simulate(config, tmp_path / "run", "executor=ray", f"ray.address=127.0.0.1:{free_port()}")
    assert run.wait(600) != 0
    assert "could not join the Ray cluster" in run.output, run.output
