"""Helpers for the tests that run real servers and client processes on loopback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gefl.aggregator.mosquitto import free_port

__all__ = ["SHORT", "TOKEN", "LogLines", "Process", "fast_slow_mix", "free_port", "read_metrics", "wait_for"]


class LogLines(list):
    """What gefl logs in this process, from every thread, as it comes (`timed`: as (monotonic time,
    message) pairs): the aggregator's log lines a test asserts on. `close()` stops collecting."""

    def __init__(self, timed: bool = False) -> None:
        super().__init__()
        lines = self

        class _Append(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                lines.append((time.monotonic(), message) if timed else message)

        self._handler = _Append(logging.DEBUG)
        self._logger = logging.getLogger("gefl")
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)

TOKEN = "test-enrolment-token"
SHORT = {"num_clients": 3, "tiers": ["cnn2", "cnn3", "cnn4"], "rounds": 2, "partition": {"samples_per_client": 200},
         "train": {"local_epochs": 1}, "eval": {"every": 1},
         "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {"local_epochs": 1}}}
"""A GeFL-F run of four rounds, one per phase and two head rounds: the networked simulations compare it
with the in-process one."""


def fast_slow_mix(path: Path) -> Path:
    """A devices file of two fast devices and one slow one, 1 s deadline: at 1000 samples per round the fast
    ones train any tier in well under a second, the slow one needs 20 s and straggles every round."""
    import yaml

    path.write_text(yaml.safe_dump({
        "profiles": {"fast": {"memory_available_mb": 8000, "train_samples_per_s": 20000},
                     "slow": {"memory_available_mb": 8000, "train_samples_per_s": 50}},
        "policy": {"deadline_s": 1.0}, "mix": {"fast": 2, "slow": 1}}))
    return path


def read_metrics(run: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl (the aggregator may be writing the last one right now)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    until = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A `gefl` subprocess whose output is collected line by line with the time each line arrived."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gefl.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_line(self, needle: str, timeout: float = 60) -> str:
        def seen() -> bool:
            return any(needle in line for _, line in self.lines) or self.proc.poll() is not None

        wait_for(seen, timeout, f"{needle!r} in the output")
        for _, line in self.lines:
            if needle in line:
                return line
        self._reader.join(2)
        raise AssertionError(f"process exited ({self.proc.returncode}) without printing {needle!r}:\n{self.output}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def make_certs(directory: Path) -> dict[str, Path]:
    """`gefl certs`' PKI (gefl.aggregator.certs): a CA, a server certificate for localhost/127.0.0.1 and
    a client certificate for device board-1, plus a second CA that signed nothing of ours (for the
    wrong-CA cases). Keys name the files: ca, server, server-key, client, client-key, other-ca."""
    from gefl.aggregator.certs import issue  # cryptography: only the tests that need certificates import it

    pki = issue(directory / "pki", clients=["board-1"])
    other = issue(directory / "other", server=False)
    layout = pki.layout
    return {"ca": layout.ca_cert, "server": layout.server_cert, "server-key": layout.server_key,
            "client": layout.client_cert("board-1"), "client-key": layout.client_key("board-1"),
            "other-ca": other.layout.ca_cert}


def tampered(good: dict, **changes) -> bytes:
    """`good` (name -> array) encoded with entries replaced or, for None, removed: the hostile uploads
    the gRPC and MQTT tests send. Names use __ for . (head__fc__weight)."""
    from gefl.protocol.wire import encode_arrays

    arrays = {k: v.copy() for k, v in good.items()}
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return encode_arrays(arrays)
