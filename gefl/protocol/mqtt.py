"""How gefl.protocol travels over MQTT: broker URLs, topic names, message framing and sealing, connections.

Shared by the aggregator's bridge (aggregator/mqtt_bridge.py) and the client transport
(edge_client/mqtt_transport.py), so the two ends cannot disagree on a topic or a byte.

Topics, all under gefl/<federation>/ (F below); <name> is the client's device name, which the
example broker ACL (configs/mosquitto/acl) ties to its MQTT username:

  F/aggregator/status         aggregator -> all  retained; last will {"status": "offline"}
  F/client/<name>/register    client -> agg.     JSON registration (enrolment token, credential); the
                                                 topic names the client, a body naming another is refused
  F/client/<name>/reply       aggregator -> one  sealed JSON answers: registration, upload verdicts, refusals
  F/client/<name>/task        aggregator -> one  sealed, retained JSON task (a late or reconnecting client
                                                 has it at once), listing each artifact's chunk hashes
  F/client/<name>/result      client -> agg.     framed upload chunks, each with the client's token
  F/client/<name>/status      client -> agg.     JSON heartbeat: token, session, the task id held and the
                                                 chunks a download misses (both sent again); last will:
                                                 the session's MAC'd "offline"
  F/artifacts/current         aggregator -> all  retained JSON: the open round's artifacts per tier
  F/artifacts/<sha256>/<i>    aggregator -> all  retained framed chunk i of the artifact with that sha256

Artifacts are addressed by content, so the generator (the same bytes for every tier) is stored
once in the broker however many tiers take part. Chunked messages are frames: a 4-byte big-endian
length, a JSON header, then raw bytes. Everything is QoS 1 except heartbeats (QoS 0).

Who wrote a message is proven by the message itself, since a broker without an ACL lets anyone
publish anywhere (keys are sha256 digests of secrets, because the aggregator keeps only the
sha256 of each client token; MACs are HMAC-SHA256 over `mac_input`'s length-prefixed parts):

- client -> aggregator: result chunks and heartbeats carry the client token; registrations the
  enrolment token and the device's credential. The last will is {"status": "offline", "session":
  S, "mac": HMAC(sha256(token), "offline", S, name)}, S being a random id the client picks for
  each connection and announces in its heartbeats: the aggregator honours an offline message only
  for the session the client last announced, so a forged one fails the MAC and an old will
  replayed after a reconnection names a session that is over.
- aggregator -> client: tasks and replies are sealed: the payload is the hex HMAC(key, "sealed",
  topic, body), a newline, and the JSON body. The key is sha256(client token); a registration
  reply (the client has no token yet) is sealed with sha256(enrolment token the request carried)
  and names the request's request_id. A task's id is <aggregator session>:<serial>, and a client
  ignores a task older than the one it holds (a replay). Artifact chunks are shared by every
  client, so they are checked against the per-chunk sha256 list of the (sealed) task instead.

This defeats whoever can publish but not read. Tokens travel in heartbeats and result chunks, so
only TLS and an ACL that keeps other users from reading those topics keep them secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gefl.errors import GeflError
from gefl.protocol import valid_client_name
from gefl.protocol.wire import CHUNK_BYTES

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # paho is imported by Connection only: parsing URLs and messages does not need it
    import paho.mqtt.client as mqtt

MAX_JSON_BYTES = 64 * 1024
"""Largest JSON message (registration, heartbeat, task, reply) either end accepts."""
MAX_FRAME_HEADER = 4 * 1024
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_FRAME_HEADER
"""Largest chunk message: one chunk plus its header; anything larger is dropped unread."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON message may have: no gefl message needs more than
three, and json.loads recurses once per level, so 60 000 brackets would exhaust the stack of the
thread that parses them (paho's network thread, on the client)."""
KEEPALIVE_S = 10
"""MQTT keepalive: the broker publishes a vanished client's last will within 1.5 x this."""
LOG_EVERY_S = 5.0
"""A drop repeated on one topic for one reason is logged once per this many seconds (a flood of
forgeries must not flood the log as well)."""
_FEDERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SESSION = re.compile(r"^[0-9a-f]{16,64}\Z")
_MAC = re.compile(rb"^[0-9a-f]{64}\Z")


class Malformed(GeflError):
    """A message that does not parse as what its topic carries; the receiver drops it and logs why."""


class Forged(Malformed):
    """A message whose MAC does not verify under any key the receiver holds for its topic."""


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
CLIENT_KINDS = ("register", "task", "reply", "result", "status")


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
    def current(self) -> str:
        return f"{self.root}/artifacts/current"

    def chunk(self, sha: str, index: int) -> str:
        return f"{self.root}/artifacts/{sha}/{index}"

    def chunks(self, sha: str) -> str:
        return f"{self.root}/artifacts/{sha}/+"

    def client(self, name: str, kind: str) -> str:
        """kind: one of CLIENT_KINDS (register, task, reply, result, status)."""
        return f"{self.root}/client/{name}/{kind}"

    def every_client(self, kind: str) -> str:
        return f"{self.root}/client/+/{kind}"

    def client_of(self, topic: str) -> tuple[str, str]:
        """(name, kind) of a per-client topic."""
        prefix = f"{self.root}/client/"
        name, _, kind = topic[len(prefix):].partition("/")
        if not topic.startswith(prefix) or not valid_client_name(name) or kind not in CLIENT_KINDS:
            raise Malformed(f"{topic} is not a client topic")
        return name, kind


# ---------------------------------------------------------------------------------------- messages
def encode_json(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _check_depth(payload: bytes, what: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH by scanning the bytes, before json.loads recurses.

    Brackets inside strings do not count; a payload with fewer brackets than the bound cannot be
    too deep, so ordinary messages are never scanned byte by byte."""
    if payload.count(b"[") + payload.count(b"{") <= MAX_JSON_DEPTH:
        return
    depth, in_string, escaped = 0, False, False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise Malformed(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1


def decode_json(payload: bytes, what: str) -> dict:
    if len(payload) > MAX_JSON_BYTES:
        raise Malformed(f"{what}: {len(payload):,} bytes, more than the {MAX_JSON_BYTES:,} a JSON message may have")
    payload = bytes(payload)
    _check_depth(payload, what)
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
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


# ---------------------------------------------------------------------------------------- authentication
def key_of(secret: str) -> bytes:
    """The MAC key that stands for a token: its sha256 digest, which is all the aggregator keeps of
    a client token (Client.token_sha256), so both ends can compute it and a stolen registry cannot
    be turned back into tokens."""
    return hashlib.sha256(secret.encode()).digest()


def key_of_sha256(hexdigest: str) -> bytes:
    """key_of(token) from the token's stored sha256 hex digest."""
    return bytes.fromhex(hexdigest)


def mac_input(label: str, *parts: str | bytes) -> bytes:
    """The bytes a MAC covers: the label (which kind of MAC: one can never pass for another) and
    every part, each prefixed with its 4-byte length, so that no two lists of parts coincide."""
    out = bytearray()
    for part in (label, *parts):
        data = part.encode() if isinstance(part, str) else bytes(part)
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def mac(key: bytes, label: str, *parts: str | bytes) -> str:
    return hmac.new(key, mac_input(label, *parts), hashlib.sha256).hexdigest()


def new_session() -> str:
    """A fresh session id for one connection (its last will names it)."""
    return secrets.token_hex(8)


def valid_session(session: object) -> bool:
    return isinstance(session, str) and bool(_SESSION.match(session))


def offline_message(key: bytes, session: str, name: str) -> bytes:
    """A client's last will (and last words): offline, for this session only, MAC'd with its key."""
    return encode_json({"status": "offline", "session": session, "mac": mac(key, "offline", session, name)})


def offline_is_genuine(key: bytes, session: str, name: str, message: dict) -> bool:
    """Whether `message` is the offline message of `name`'s session `session` (compared in constant time)."""
    return (message.get("session") == session and isinstance(message.get("mac"), str)
            and hmac.compare_digest(message["mac"], mac(key, "offline", session, name)))


def seal(key: bytes, topic: str, message: dict) -> bytes:
    """`message` for `topic`, authenticated: hex MAC, newline, JSON body. The topic is covered, so a
    sealed message cannot be replayed on another client's topic."""
    body = encode_json(message)
    return mac(key, "sealed", topic, body).encode() + b"\n" + body


def unseal(payload: bytes, topic: str, keys: Sequence[bytes], what: str) -> tuple[dict, int]:
    """The sealed message and the index in `keys` of the key that verifies it; Forged if none does."""
    payload = bytes(payload)
    tag, newline, body = payload.partition(b"\n")
    if not newline or not _MAC.match(tag):
        raise Forged(f"{what}: not sealed by the aggregator (no MAC): ignored")
    for index, key in enumerate(keys):
        if hmac.compare_digest(tag.decode(), mac(key, "sealed", topic, body)):
            return decode_json(body, what), index
    raise Forged(f"{what}: its MAC does not verify (forged, or sealed for another token): ignored")


class LogLimiter:
    """Says each (topic, reason) at most once per LOG_EVERY_S, counting what it held back: a drop
    is always logged, a flood of identical drops only now and then."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, topic: str, text: str) -> None:
        now, key = time.monotonic(), (topic, text)
        with self._lock:
            last, held = self._last.get(key, (-self.every_s, 0))
            if now - last < self.every_s:
                self._last[key] = (last, held + 1)
                return
            if len(self._last) > 4096:
                self._last.clear()
            self._last[key] = (now, 0)
        self.logger.warning(text + (f" ({held} more like it since)" if held else ""))


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


Will = tuple[str, bytes, bool]
"""(topic, payload, retain) of a last will."""


class Connection:
    """A paho-mqtt 2.x client (callback API version 2) on its own network thread, reconnecting by
    itself (1 s doubling to 10 s) and calling `on_connect` after every (re)connection, where the
    owner subscribes and republishes whatever a restarted broker has forgotten.

    `will` may be a function: it is asked again before every connection (paho sends the will in
    CONNECT), so a client can give each connection a last will of its own. The broker's verdict on
    every subscription is checked (SUBACK reason codes): `refused_subscriptions` names those it
    turned down, for instance by an ACL, and each is said at once. A publish that fails is said
    and counted (`publish_failures`); the owner knows whether it matters."""

    def __init__(self, url: BrokerUrl, client_id: str, auth: MqttAuth, *,
                 on_message: Callable[[mqtt.MQTTMessage], None], on_connect: Callable[[], None],
                 will: Will | Callable[[], Will | None] | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.url = url
        self.connected = threading.Event()
        self._closing = False
        self._restarting = False
        self._quiet_connect = False
        self.refusal: str | None = None
        """Why the broker turned the last connection attempt down (bad credentials), if it did."""
        self.generation = 0
        """Counts connections: a request sent in an earlier one may have been lost with the broker."""
        self.publish_failures = 0
        self.refused_subscriptions: list[str] = []
        """Topics the broker refused a subscription to (each said when it happened)."""
        self._pending_subscriptions: dict[int, tuple[str, ...]] = {}
        self._subscriptions = threading.Condition()
        self._ever_connected = False
        self._on_connect = on_connect
        self._on_message = on_message
        self._will = will
        self._publish_log = LogLimiter(log)
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
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_subscribe = self._subscribed
        self.client.on_message = self._message

    def _set_will(self) -> None:
        will = self._will() if callable(self._will) else self._will
        if will is None:
            self.client.will_clear()
        else:
            topic, payload, retain = will
            self.client.will_set(topic, payload, qos=1, retain=retain)

    def start(self) -> None:
        self._set_will()
        self.client.connect_async(self.url.host, self.url.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()

    def restart(self) -> None:
        """Disconnect cleanly (no will is published) and connect again with a freshly asked will:
        the way to change the last will, which the broker only takes in CONNECT."""
        self._restarting = self._quiet_connect = True
        try:
            self.client.disconnect()
            self.client.loop_stop()
            self.connected.clear()
        finally:
            self._restarting = False
        self.start()

    def _message(self, _client, _userdata, message) -> None:
        """Every message, whatever it holds, ends here: an exception escaping into paho would kill its
        network thread, and with it this end of the federation."""
        try:
            self._on_message(message)
        except Exception as exc:  # noqa: BLE001 - a malformed payload must never stop the connection
            log.exception(f"mqtt: dropped a message on {getattr(message, 'topic', '?')}: unexpected {exc!r}")

    def _connected(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            self.refusal = (f"the MQTT broker {self.url} refused the connection: {reason_code} (check the MQTT "
                            "username, GEFL_MQTT_PASSWORD and the broker's password file)")
            log.error(f"mqtt: {self.refusal}")
            return
        self.refusal = None
        if self._ever_connected and not self._quiet_connect:
            log.info(f"mqtt: reconnected to {self.url}")
        self._quiet_connect = False
        self._ever_connected = True
        self.generation += 1
        try:
            self._on_connect()
        except Exception as exc:  # noqa: BLE001 - as in _message: paho's thread must live on
            log.exception(f"mqtt: after connecting: unexpected {exc!r}")
        self.connected.set()

    def _disconnected(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if self.connected.is_set() and not self._closing and not self._restarting:
            log.warning(f"mqtt: lost the connection to {self.url} ({reason_code}); reconnecting")
        self.connected.clear()
        if not self._closing:
            try:
                self._set_will()  # the next connection's
            except Exception as exc:  # noqa: BLE001
                log.warning(f"mqtt: cannot set the last will: {exc!r}")

    def _subscribed(self, _client, _userdata, mid, reason_codes, _properties) -> None:
        with self._subscriptions:
            topics = self._pending_subscriptions.pop(mid, ())
            for topic, code in zip(topics, reason_codes, strict=False):
                if code.is_failure:
                    self.refused_subscriptions.append(topic)
                    log.error(f"mqtt: the broker {self.url} refused the subscription to {topic} ({code}): "
                             "check the broker's ACL for this MQTT user")
            self._subscriptions.notify_all()

    def wait_connected(self, timeout: float) -> bool:
        """Whether connected within `timeout`; raises at once if the broker refuses the credentials."""
        until = time.monotonic() + timeout
        while not self.connected.wait(min(0.1, max(0.0, until - time.monotonic()))):
            if self.refusal is not None:
                raise GeflError(self.refusal)
            if time.monotonic() >= until:
                return False
        return True

    def wait_subscribed(self, timeout: float) -> bool:
        """Whether the broker has answered every subscription asked so far, within `timeout`."""
        until = time.monotonic() + timeout
        with self._subscriptions:
            while self._pending_subscriptions:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._subscriptions.wait(min(left, 0.1))
        return True

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessageInfo:
        """Publish; a failure (no connection, paho's queue full) is said and counted, and the info's
        rc tells the caller, which decides whether to retry."""
        import paho.mqtt.client as mqtt

        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.publish_failures += 1
            if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
                fate = "not connected; paho sends it once the connection is back"
            else:
                fate = f"{mqtt.error_string(info.rc)}; lost" + (
                    " (retained state is published again after every reconnection)" if retain else "")
            self._publish_log(topic, f"mqtt: could not publish on {topic}: {fate}")
        return info

    def subscribe(self, *topics: str) -> None:
        with self._subscriptions:
            rc, mid = self.client.subscribe([(t, 1) for t in topics])
            if rc == 0 and mid is not None:
                self._pending_subscriptions[mid] = topics

    def unsubscribe(self, *topics: str) -> None:
        self.client.unsubscribe(list(topics))

    def close(self, last_words: Will | None = None) -> None:
        """Disconnect cleanly (no last will); `last_words` is published first, as the will would have been.

        Waiting for the broker to acknowledge `last_words`, sent after everything queued before it,
        keeps a disconnect from dropping those: with 1000 clients the last round's tasks are 1000
        QoS 1 messages, and paho sends 20 at a time."""
        self._closing = True
        if last_words is not None and self.connected.is_set():
            topic, payload, retain = last_words
            with contextlib.suppress(RuntimeError, ValueError):  # the connection went meanwhile
                self.publish(topic, payload, retain=retain).wait_for_publish(30.0)
        self.client.disconnect()
        self.client.loop_stop()
