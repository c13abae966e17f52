"""A training board installs `gefl-edge[client]` and nothing more: `gefl probe` and `gefl client run`
must import nothing that the client extra does not bring (no torchvision, onnx, onnxscript,
onnxruntime, cryptography, grpc health checking).

The allowed modules are derived from the installed metadata: every distribution the client extra
requires, transitively, and the standard library. A client really trains a GeFL-F run here, against
a real gRPC aggregator on loopback, so the generator code is imported too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest
from gefl.aggregator.grpc_server import start_server
from gefl.aggregator.serve import build_coordinator
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gefl.config import config_from_dict
from gefl.image_folder import write_split

from netutil import TOKEN

NEVER = {"torchvision", "onnx", "onnxscript", "onnxruntime", "cryptography"}
"""What a board must not pay for, named so that a failure says it plainly (the client extra does not
have them, so the check against the extra's distributions catches them too)."""

RECORD = ("import atexit, json, sys\n"
          "atexit.register(lambda: open(sys.argv[1], 'w').write(json.dumps(sorted(sys.modules))))\n"
          "from gefl.cli import main\n"
          "sys.exit(main(sys.argv[2:]))\n")
"""Run the command line and write, at exit, every module the process imported."""


def _distributions(requirement: str, extras: frozenset[str] = frozenset(), seen: set[str] | None = None) -> set[str]:
    """The distribution and everything it requires with `extras`, transitively (markers evaluated)."""
    seen = set() if seen is None else seen
    name = canonicalize_name(Requirement(requirement).name)
    key = f"{name}[{','.join(sorted(extras))}]"
    if key in seen:
        return seen
    seen.add(key)
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            _distributions(req.name, frozenset(req.extras), seen)
    return seen


def _allowed_modules() -> set[str]:
    dists = {key.split("[")[0] for key in _distributions("gefl-edge", frozenset({"client"}))}
    owners = metadata.packages_distributions()
    return {module for module, names in owners.items() if any(canonicalize_name(n) in dists for n in names)}


def _imported(tmp_path: Path, *args: str) -> set[str]:
    """Top-level names of the modules `gefl ARGS` imported (the token travels in the environment)."""
    out = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", RECORD, str(out), *args], check=True, timeout=600,
                   env={**os.environ, "GEFL_TOKEN": TOKEN})
    return {m.split(".")[0] for m in json.loads(out.read_text())}


def _outside_the_client_extra(modules: set[str]) -> set[str]:
    # cython_runtime is the module Cython's extensions create for themselves: it has no distribution.
    # grpc's own __init__ imports these three when they happen to be installed (this test environment
    # has them for the aggregator and the stub generator); a board without them never misses them.
    allowed = _allowed_modules() | set(sys.stdlib_module_names) | {"gefl", "cython_runtime"}
    allowed |= {"grpc_health", "grpc_reflection", "grpc_tools"}
    return {m for m in modules if m not in allowed and not m.startswith("_")}


def test_the_client_extra_covers_what_probe_imports(tmp_path):
    modules = _imported(tmp_path, "probe", "--json")
    assert "torch" in modules  # it trains the reference tier for a second
    assert not modules & NEVER, modules & NEVER
    assert not _outside_the_client_extra(modules), _outside_the_client_extra(modules)


@pytest.mark.parametrize("algorithm", ["gefl-f", "fedavg"])
def test_the_client_extra_covers_what_a_training_client_imports(tmp_path, algorithm):
    shards = tmp_path / "shards"
    write_split("fashion-mnist", 1, shards, samples_per_client=100, seed=0)
    cfg = config_from_dict({"algorithm": algorithm, "num_clients": 1, "tiers": ["cnn3c"], "rounds": 1,
                            "train": {"local_epochs": 1}, "partition": {"samples_per_client": 100},
                            "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {"local_epochs": 1}}})
    coordinator = build_coordinator(cfg, tmp_path / "state", TOKEN)
    server, port, _ = start_server(coordinator, "127.0.0.1:0")
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    try:
        modules = _imported(tmp_path, "client", "run", "--aggregator", f"127.0.0.1:{port}", "--data-dir",
                            str(shards / "client-000"), "--tier", "auto", "--name", "board", "--threads", "1",
                            "--give-up", "60")
    finally:
        coordinator.stopping.set()
        driver.join(30)
        server.stop(grace=None)
    assert coordinator.federation.finished  # it really took part, to the end
    assert {"torch", "grpc", "safetensors"} <= modules
    assert not modules & NEVER, modules & NEVER
    assert not _outside_the_client_extra(modules), _outside_the_client_extra(modules)
