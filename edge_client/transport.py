"""What the client runtime needs from a transport, and the errors it acts on.

Two transports implement it: gRPC (edge_client/grpc_transport.py) and MQTT
(edge_client/mqtt_transport.py), both importing their base from here; `open_transport`
(edge_client/connect.py, which nothing here imports back) picks one from the aggregator's address.
Both are torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from gefl.errors import GeflError
from gefl.protocol import ArtifactRef, Refused, RegisterRequest, Registration, TaskInfo, UploadHeader


class Unavailable(GeflError):
    """The aggregator cannot be reached (down, restarting, network or broker gone): retry later."""


class Unauthenticated(Refused):
    """The aggregator does not know this client's token (it lost its state): register again."""


class ClientTransport(Protocol):
    address: str

    def register(self, request: RegisterRequest) -> Registration: ...

    def fetch_task(self, wait_s: float) -> TaskInfo:
        """The next task, waiting up to `wait_s` for one; a TRAIN task is returned once."""
        ...

    def download(self, round_number: int, ref: ArtifactRef) -> bytearray:
        """The artifact's bytes, checked against the size and sha256 its task announced."""
        ...

    def upload(self, header: UploadHeader, payload: bytes) -> str: ...

    def heartbeats(self, interval_s: float, stop: threading.Event,
                   on_reply: Callable[[int, bool], None] | None = None) -> None:
        """Signal liveness until `stop` is set or the run finishes; raises Unavailable on a broken link."""
        ...

    def close(self) -> None: ...
