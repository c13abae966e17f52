"""What the client runtime needs from a transport, and the errors it acts on.

Two transports implement it: gRPC (edge_client/grpc_transport.py) and MQTT
(edge_client/mqtt_transport.py); `open_transport` picks one from the aggregator's address.
Both are torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
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


def open_transport(aggregator: str, enrol_token: str, *, ca: str | None = None, cert: str | None = None,
                   key: str | None = None, mqtt_user: str | None = None,
                   mqtt_password: str | None = None, insecure: bool = False) -> ClientTransport:
    """gRPC for HOST:PORT, MQTT for mqtt://HOST:PORT[/FEDERATION] or mqtts://... (TLS). Plaintext
    (no --ca, or mqtt://) off loopback needs `insecure`."""
    from gefl import mqtt
    from gefl.protocol import check_plaintext

    if mqtt.is_broker_url(aggregator):
        from gefl.edge_client.mqtt_transport import MqttClientTransport

        url = mqtt.parse_broker_url(aggregator)
        if not url.tls:
            check_plaintext(url.host, "MQTT (mqtt://)", insecure)

        auth = mqtt.MqttAuth(mqtt_user, mqtt_password, Path(ca) if ca else None, Path(cert) if cert else None,
                             Path(key) if key else None)
        return MqttClientTransport(mqtt.parse_broker_url(aggregator), enrol_token, auth)
    if mqtt_user or mqtt_password:
        raise GeflError("--mqtt-user and --mqtt-password are for an MQTT aggregator (mqtt[s]://HOST:PORT); "
                        f"{aggregator} is a gRPC address")
    from gefl.edge_client.grpc_transport import GrpcClientTransport

    if ca is None:
        check_plaintext(aggregator.rsplit(":", 1)[0], "gRPC", insecure)
    return GrpcClientTransport(aggregator, enrol_token, ca=ca, cert=cert, key=key)
