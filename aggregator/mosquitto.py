"""A private Mosquitto broker on a free loopback port, for `gefl simulate --transport mqtt` and the tests.

It runs the Debian package's `mosquitto` binary with a generated config in a temporary directory
(no persistence: a restart forgets retained messages, which is what the aggregator must cope
with). `kill()` and `start()` again keep the port, so a test can take the broker away mid-run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gefl.errors import GeflError

START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if found is None:
        raise GeflError("the mosquitto broker is not installed: apt-get install mosquitto (or pass --broker URL "
                        "to use a broker that runs elsewhere)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the one helper: tests and benchmarks import it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, port: int | None = None, config: str | None = None, workdir: Path | None = None) -> None:
        """`config`: the whole mosquitto.conf (it must listen on `port`); default: plain MQTT on
        127.0.0.1, anonymous clients allowed. `workdir` is the broker's working directory (relative
        paths in the config are read from it); default: a temporary one."""
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="gefl-mosquitto-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.conf = self.workdir / "gefl-mosquitto.conf"
        self.conf.write_text(config or f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             # The aggregator's subscription takes every client's result chunks at once.
                             "max_queued_messages 100000\n")
        self.log = self.workdir / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], cwd=self.workdir,
                                            stdout=log, stderr=subprocess.STDOUT)
        until = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise GeflError(f"mosquitto exited with code {self.process.returncode} at start; its log "
                                f"({self.log}):\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > until:
                    self.stop()
                    raise GeflError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S:.0f} s; "
                                    f"see {self.log}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word, as a crashed or power-cut one would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.close()
