"""How gefl.protocol travels over MQTT: broker URLs, topic names, message framing, connections.

Shared by the aggregator's bridge (aggregator/mqtt_bridge.py) and the client transport
(edge_client/mqtt_transport.py), so the two ends cannot disagree on a topic or a byte.

Topics, all under gefl/<federation>/ (F below); <name> is the client's device name, which the
example broker ACL (configs/mosquitto/acl) ties to its MQTT username:

  F/aggregator/status       aggregator -> all   retained; last will {"status": "offline"}
  F/register                client -> agg.      JSON registration request (carries the enrolment token)
  F/client/<name>/reply     aggregator -> one   JSON answers: registration, upload verdicts, refusals
  F/client/<name>/task      aggregator -> one   retained JSON task (a late or reconnecting client has it at once)
  F/client/<name>/result    client -> agg.      framed upload chunks, each with the client's token
  F/client/<name>/status    client -> agg.      JSON heartbeat with the token; last will {"status": "offline"}
  F/artifacts/current       aggregator -> all   retained JSON: the open round's artifacts per tier
  F/artifacts/<sha256>/<i>  aggregator -> all   retained framed chunk i of the artifact with that sha256

Artifacts are addressed by content, so the generator (the same bytes for every tier) is stored
once in the broker however many tiers take part. Chunked messages are frames: a 4-byte big-endian
length, a JSON header, then raw bytes. Everything is QoS 1 except heartbeats (QoS 0).
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gefl.errors import GeflError
from gefl.protocol import valid_client_name
from gefl.wire import CHUNK_BYTES

if TYPE_CHECKING:  # paho is imported by Connection only: parsing URLs and messages does not need it
    import paho.mqtt.client as mqtt

MAX_JSON_BYTES = 64 * 1024
"""Largest JSON message (registration, heartbeat, task, reply) either end accepts."""
MAX_FRAME_HEADER = 4 * 1024
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_FRAME_HEADER
"""Largest chunk message: one chunk plus its header; anything larger is dropped unread."""
KEEPALIVE_S = 10
"""MQTT keepalive: the broker publishes a vanished client's last will within 1.5 x this."""
_FEDERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Malformed(GeflError):
    """A message that does not parse as what its topic carries; the receiver drops it and logs why."""


# ---------------------------------------------------------------------------------------- URLs
@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    federation: str | None
    """From the URL's path (mqtt://host:1883/fmnist-quickstart); None: ask the broker which one is served."""

    def __str__(self) -> str:
        path = f"/{self.federation}" if self.federation else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}{path}"


def is_broker_url(text: str) -> bool:
    return text.startswith(("mqtt://", "mqtts://"))


def parse_broker_url(text: str) -> BrokerUrl:
    """mqtt://HOST[:PORT][/FEDERATION] or mqtts://... (TLS, default port 8883)."""
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise GeflError(f"broker URL {text!r} is not valid: use mqtt://HOST:PORT or mqtts://HOST:PORT (TLS), "
                        "optionally followed by /FEDERATION")
    if parts.username or parts.password:
        raise GeflError("give the MQTT username with --mqtt-user and the password in GEFL_MQTT_PASSWORD, not in "
                        "the URL, where process listings show them")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as exc:
        raise GeflError(f"broker URL {text!r}: {exc}") from exc
    federation = parts.path.strip("/") or None
    if federation is not None and not _FEDERATION.match(federation):
        raise GeflError(f"federation {federation!r} in {text!r} is not a valid topic level: letters, digits, ._-")
    return BrokerUrl(parts.hostname, port, parts.scheme == "mqtts", federation)


def check_federation(name: str) -> str:
    if not _FEDERATION.match(name):
        raise GeflError(f"federation name {name!r} cannot be an MQTT topic level: use letters, digits and ._- "
                        "(it is the config's `name`)")
    return name


# ---------------------------------------------------------------------------------------- topics
@dataclass(frozen=True)
class Topics:
    federation: str

    @property
    def root(self) -> str:
        return f"gefl/{self.federation}"

    @property
    def aggregator_status(self) -> str:
        return f"{self.root}/aggregator/status"

    @property
    def register(self) -> str:
        return f"{self.root}/register"

    @property
    def current(self) -> str:
        return f"{self.root}/artifacts/current"

    def chunk(self, sha: str, index: int) -> str:
        return f"{self.root}/artifacts/{sha}/{index}"

    def chunks(self, sha: str) -> str:
        return f"{self.root}/artifacts/{sha}/+"

    def client(self, name: str, kind: str) -> str:
        """kind: task, reply, result or status."""
        return f"{self.root}/client/{name}/{kind}"

    def every_client(self, kind: str) -> str:
        return f"{self.root}/client/+/{kind}"

    def client_of(self, topic: str) -> tuple[str, str]:
        """(name, kind) of a per-client topic."""
        prefix = f"{self.root}/client/"
        name, _, kind = topic[len(prefix):].partition("/")
        if not topic.startswith(prefix) or not valid_client_name(name) or "/" in kind:
            raise Malformed(f"{topic} is not a client topic")
        return name, kind


# ---------------------------------------------------------------------------------------- messages
def encode_json(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_json(payload: bytes, what: str) -> dict:
    if len(payload) > MAX_JSON_BYTES:
        raise Malformed(f"{what}: {len(payload):,} bytes, more than the {MAX_JSON_BYTES:,} a JSON message may have")
    try:
        message = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Malformed(f"{what}: not JSON ({exc})") from exc
    if not isinstance(message, dict):
        raise Malformed(f"{what}: a JSON object was expected")
    return message


def encode_frame(header: dict, data: bytes | memoryview) -> bytes:
    head = encode_json(header)
    return struct.pack(">I", len(head)) + head + bytes(data)


def decode_frame(payload: bytes, what: str) -> tuple[dict, bytes]:
    if len(payload) > MAX_FRAME_BYTES:
        raise Malformed(f"{what}: {len(payload):,} bytes, more than one chunk ({MAX_FRAME_BYTES:,})")
    if len(payload) < 4:
        raise Malformed(f"{what}: {len(payload)} bytes, too short for a frame")
    (length,) = struct.unpack(">I", payload[:4])
    if length > MAX_FRAME_HEADER or 4 + length > len(payload):
        raise Malformed(f"{what}: frame header of {length:,} bytes does not fit the message")
    return decode_json(payload[4:4 + length], what), payload[4 + length:]


def field(message: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """message[key], checked to be of `kind` (bool never passes for int)."""
    value = message.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise Malformed(f"{what}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


# ---------------------------------------------------------------------------------------- connections
@dataclass(frozen=True)
class MqttAuth:
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    """CA certificate that signed the broker's: required by mqtts:// URLs."""
    cert: Path | None = None
    key: Path | None = None
    """This end's certificate and key, for brokers that require client certificates."""


class Connection:
    """A paho-mqtt 2.x client (callback API version 2) on its own network thread, reconnecting by
    itself (1 s doubling to 10 s) and calling `on_connect` after every (re)connection, where the
    owner subscribes and republishes whatever a restarted broker has forgotten."""

    def __init__(self, url: BrokerUrl, client_id: str, auth: MqttAuth, *,
                 on_message: Callable[[mqtt.MQTTMessage], None], on_connect: Callable[[], None],
                 will: tuple[str, bytes, bool] | None = None, say: Callable[[str], None] = print) -> None:
        import paho.mqtt.client as mqtt

        self.url, self.say = url, say
        self.connected = threading.Event()
        self._closing = False
        self.refusal: str | None = None
        """Why the broker turned the last connection attempt down (bad credentials), if it did."""
        self.generation = 0
        """Counts connections: a request sent in an earlier one may have been lost with the broker."""
        self._ever_connected = False
        self._lock = threading.Lock()
        self._on_connect = on_connect
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(64)
        if auth.username:
            self.client.username_pw_set(auth.username, auth.password)
        if url.tls:
            if auth.ca is None:
                raise GeflError(f"{url} is a TLS broker: pass the CA certificate that signed it with --ca "
                                "(or --mqtt-ca on the aggregator)")
            for path, what in ((auth.ca, "CA certificate"), (auth.cert, "client certificate"), (auth.key, "key")):
                if path is not None and not Path(path).is_file():
                    raise GeflError(f"cannot read the {what} {path}")
            self.client.tls_set(ca_certs=str(auth.ca), certfile=str(auth.cert) if auth.cert else None,
                                keyfile=str(auth.key) if auth.key else None)
        elif auth.cert or auth.ca:
            raise GeflError(f"certificates were given but {url} is not TLS: use mqtts://")
        if will is not None:
            topic, payload, retain = will
            self.client.will_set(topic, payload, qos=1, retain=retain)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = lambda _c, _u, message: on_message(message)

    def start(self) -> None:
        self.client.connect_async(self.url.host, self.url.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()

    def _connected(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            self.refusal = (f"the MQTT broker {self.url} refused the connection: {reason_code} (check the MQTT "
                            "username, GEFL_MQTT_PASSWORD and the broker's password file)")
            self.say(f"mqtt: {self.refusal}")
            return
        self.refusal = None
        if self._ever_connected:
            self.say(f"mqtt: reconnected to {self.url}")
        self._ever_connected = True
        self.generation += 1
        self._on_connect()
        self.connected.set()

    def _disconnected(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if self.connected.is_set() and not self._closing:
            self.say(f"mqtt: lost the connection to {self.url} ({reason_code}); reconnecting")
        self.connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Whether connected within `timeout`; raises at once if the broker refuses the credentials."""
        until = time.monotonic() + timeout
        while not self.connected.wait(min(0.1, max(0.0, until - time.monotonic()))):
            if self.refusal is not None:
                raise GeflError(self.refusal)
            if time.monotonic() >= until:
                return False
        return True

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, *topics: str) -> None:
        self.client.subscribe([(t, 1) for t in topics])

    def unsubscribe(self, *topics: str) -> None:
        self.client.unsubscribe(list(topics))

    def close(self, last_words: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly (no last will); `last_words` is published first, as the will would have been."""
        self._closing = True
        if last_words is not None and self.connected.is_set():
            topic, payload, retain = last_words
            with contextlib.suppress(RuntimeError, ValueError):  # the connection went meanwhile
                self.publish(topic, payload, retain=retain).wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()
