"""`open_transport`: the client transport for an aggregator's address, gRPC or MQTT.

Apart from edge_client/transport.py (the base both transports implement) so that the transports
import their base without importing the module that imports them: each transport module is
imported only when its kind of address is opened, so a board without paho or grpcio installed
can still use the other one.
"""

from __future__ import annotations

from pathlib import Path

from gefl.edge_client.transport import ClientTransport

from gefl.errors import GeflError
from gefl.protocol import check_plaintext, mqtt


def open_transport(aggregator: str, enrol_token: str, *, ca: str | None = None, cert: str | None = None,
                   key: str | None = None, mqtt_user: str | None = None,
                   mqtt_password: str | None = None, insecure: bool = False) -> ClientTransport:
    """gRPC for HOST:PORT, MQTT for mqtt://HOST:PORT[/FEDERATION] or mqtts://... (TLS). Plaintext
    (no --ca, or mqtt://) off loopback needs `insecure`."""
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
