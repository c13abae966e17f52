"""Reading a file the user named (a certificate, a key) with an error that names it, and writing a
file so that a crash at any moment leaves the old one or the new one, never half.

The run directory's JSON, the checkpoint, a device's credential and the PEM files of `gefl certs`
all go through this one function: the data reach the disk before the rename, the rename before
it returns, and a file holding a secret is created with its final mode, never readable by others
for an instant.
"""

from __future__ import annotations

import os
from pathlib import Path

from gefl.errors import GeflError


def read_file(path: str | Path, what: str) -> bytes:
    """The bytes of `path`; a GeflError naming `what` ("TLS key") and the file if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise GeflError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` (created with `mode`; the umask does not widen or narrow it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
