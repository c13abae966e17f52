"""How gefl-edge logs: every module logs through the standard `logging` module under the `gefl`
logger, and only the command line decides where the lines go and how they look.

A library user who does nothing sees warnings only (Python's default); `gefl` on the command line
prints progress at INFO, `--quiet` keeps warnings and errors, `--verbose` adds debug lines with
time and origin, and `--log-format json` writes one JSON object per line (time, level, logger,
message), which is what an aggregator's journal on a server wants to parse.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

ROOT = "gefl"


class JsonLines(logging.Formatter):
    """One JSON object per record: the fields a log shipper indexes, the message as written."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _Text(logging.Formatter):
    """Progress as plain lines (what `gefl simulate` prints); warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(*, quiet: bool = False, verbose: bool = False, json_lines: bool = False,
              stream: TextIO | None = None) -> None:
    """Send the `gefl` logger's records to `stream` (default stdout), replacing what an earlier call set."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if getattr(handler, "_gefl", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _Stdout()
    handler._gefl = True  # type: ignore[attr-defined]
    if json_lines:
        handler.setFormatter(JsonLines())
    elif verbose:
        handler.setFormatter(_Text("%(asctime)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_Text("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
