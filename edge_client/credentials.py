"""What a device keeps between runs: the token of its registration, per aggregator and name.

The enrolment token is shared by a whole fleet, so it cannot prove which device is which; the token
a device receives when it first registers can. The aggregator gives a registered name back only to
whoever presents that token (or a client certificate issued to the name), so a restarted client
must still have it: it lives in a small file under the client's state directory, readable by its
owner only, one file per (aggregator, name) so that clients sharing a machine never write the same
file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from gefl.files import atomic_write

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """systemd's StateDirectory= (it sets $STATE_DIRECTORY), else $XDG_STATE_HOME/gefl, else
    ~/.local/state/gefl: the places a service and a user expect a program's state."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gefl"


class CredentialStore:
    def __init__(self, state_dir: Path | None = None) -> None:
        self.directory = (state_dir or default_state_dir()) / "credentials"

    def _path(self, aggregator: str, name: str) -> Path:
        key = hashlib.sha256(f"{aggregator}\n{name}".encode()).hexdigest()[:32]
        return self.directory / f"{key}.json"

    def load(self, aggregator: str, name: str) -> str:
        """The token kept for this aggregator and name, or "" (none yet, or unreadable: registering
        then proceeds as a new device, which the aggregator accepts for a name it does not know)."""
        path = self._path(aggregator, name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return ""
        except (OSError, ValueError) as exc:
            log.warning("cannot read this device's credential %s (%s); registering without it", path, exc)
            return ""
        token = data.get("token") if isinstance(data, dict) else None
        return token if isinstance(token, str) and data.get("name") == name else ""

    def save(self, aggregator: str, name: str, token: str) -> None:
        """Keep `token`; on failure say what it costs, and carry on (this run does not need the file)."""
        path = self._path(aggregator, name)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(path, json.dumps({"aggregator": aggregator, "name": name, "token": token}).encode(), 0o600)
        except OSError as exc:
            log.warning("cannot keep this device's credential in %s (%s): after a restart it cannot register "
                        "again as %r unless the aggregator forgets it; make the directory writable or give "
                        "--state-dir", self.directory, exc.strerror or exc, name)
