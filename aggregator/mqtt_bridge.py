"""The aggregator's MQTT face: the same Coordinator as the gRPC service, over a broker.

The bridge subscribes to the registration, result and status topics (gefl/mqtt.py lists them)
and pushes what gRPC clients would poll for: each MQTT client's task as a retained message, and
the open round's artifacts as retained, content-addressed chunks, republished after every
reconnection because a restarted broker may have forgotten them. Messages are handled one at a
time on a worker thread, off paho's network thread, so a large upload being checked never stalls
the connection.

Every message is checked before it touches anything: size before parsing, the token on every
chunk and heartbeat, the topic's client name against the token's, then the coordinator's own
checks. A bad one is dropped with a log line and, when its sender can be told, a refusal on its
reply topic. Upload chunks are collected by (client, round, chunk index), so QoS 1 redeliveries
and a client resending after a reconnect count once; a resent upload that was already counted is
answered "already counted", not refused.
"""

from __future__ import annotations

import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gefl.aggregator.coordinator import Client, Coordinator

from gefl import mqtt as m
from gefl.errors import GeflError
from gefl.protocol import PROTOCOL_VERSION, Refused, RegisterRequest, TaskInfo, UploadHeader, valid_client_name
from gefl.wire import CHUNK_BYTES, chunks

QUEUE_SIZE = 256
"""Messages waiting for the worker; when full, paho's thread waits (back-pressure on the broker)."""
UNKNOWN_REPLY_EVERY_S = 5.0


@dataclass
class _Upload:
    header: UploadHeader
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)


def _header_of(message: dict, what: str) -> UploadHeader:
    return UploadHeader(
        m.field(message, "round", int, what), m.field(message, "phase", str, what), m.field(message, "name", str, what),
        m.field(message, "size", int, what), m.field(message, "sha256", str, what),
        m.field(message, "num_samples", int, what), float(m.field(message, "loss", (int, float), what)))


def task_message(task: TaskInfo, task_id: str) -> dict:
    return {"id": task_id, "status": task.status, "round": task.round, "phase": task.phase, "tier": task.tier,
            "seed": task.seed, "upload_name": task.upload_name, "max_upload_bytes": task.max_upload_bytes,
            "deadline_s": task.deadline_s,
            "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in task.artifacts]}


class MqttBridge:
    def __init__(self, coordinator: Coordinator, url: m.BrokerUrl, auth: m.MqttAuth,
                 say: Callable[[str], None] = print) -> None:
        self.coordinator = coordinator
        self.say = say
        self.topics = m.Topics(m.check_federation(url.federation or coordinator.logic.federation))
        self.url = m.BrokerUrl(url.host, url.port, url.tls, self.topics.federation)
        self._session = secrets.token_hex(4)
        """Task ids are session:serial, so a client never mistakes a new task for one it has done,
        even when a restarted aggregator numbers from 1 again."""
        self._serial = 0
        self._names: dict[str, int] = {}  # MQTT clients: name -> client id
        self._published_tasks: dict[str, tuple] = {}
        self._published_chunks: dict[str, int] = {}  # sha256 -> chunk count, retained in the broker
        self._uploads: dict[int, _Upload] = {}  # client id -> the upload being collected
        self._counted: dict[tuple[int, int], str] = {}  # (client id, round) -> sha256 counted
        self._told_unknown: dict[str, float] = {}
        self.dropped = 0
        """Messages dropped as malformed, mis-addressed or refused (the tests read it)."""
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="gefl-mqtt-bridge", daemon=True)
        offline = (self.topics.aggregator_status, m.encode_json({"status": "offline"}), True)
        self.connection = m.Connection(self.url, f"gefl-aggregator-{self.topics.federation}-{self._session}", auth,
                                       on_message=self._queue.put, on_connect=self._on_connect, will=offline, say=say)
        self._offline = offline
        coordinator.add_listener(lambda event: self._queue.put(("event", event)))

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        self._worker.start()
        self.connection.start()
        try:
            connected = self.connection.wait_connected(timeout)
        except GeflError:
            self.stop()
            raise
        if not connected:
            self.stop()
            raise GeflError(f"cannot connect to the MQTT broker {self.url} within {timeout:.0f} s (is it running, "
                            "and are the credentials right?)")

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(("stop", ""))
        self._worker.join(10)
        self.connection.close(self._offline)

    def _on_connect(self) -> None:
        """After every (re)connection: subscribe, and have the worker republish the retained state."""
        t = self.topics
        self.connection.subscribe(t.register, t.every_client("result"), t.every_client("status"))
        self._queue.put(("event", "connected"))

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            try:
                if isinstance(item, tuple):
                    kind, event = item
                    if kind == "stop":
                        return
                    self._on_event(event)
                else:
                    self._on_message(item.topic, item.payload)
            except Exception as exc:  # noqa: BLE001 - one bad message must never stop the bridge
                self.dropped += 1
                self.say(f"mqtt: dropped a message: unexpected {exc!r}")

    def _drop(self, topic: str, why: str) -> None:
        self.dropped += 1
        self.say(f"mqtt: dropped a message on {topic}: {why}")

    def _on_message(self, topic: str, payload: bytes) -> None:
        t = self.topics
        try:
            if topic == t.register:
                self._register(payload)
                return
            name, kind = t.client_of(topic)
            if kind == "result":
                self._result(name, payload)
            elif kind == "status":
                self._status(name, payload)
            else:
                raise m.Malformed(f"{kind!r} is not a topic the aggregator reads")
        except m.Malformed as exc:
            self._drop(topic, str(exc))
        except Refused as exc:
            self._drop(topic, f"refused [{exc.code}]: {exc}")

    def _reply(self, name: str, message: dict) -> None:
        self.connection.publish(self.topics.client(name, "reply"), m.encode_json(message))

    def _refuse(self, name: str, op: str, exc: Refused, **extra) -> None:
        self._reply(name, {"op": op, "ok": False, "code": exc.code, "message": str(exc), **extra})

    # ------------------------------------------------------------------ registration
    def _register(self, payload: bytes) -> None:
        what = "registration"
        msg = m.decode_json(payload, what)
        name = m.field(msg, "name", str, what)
        if not valid_client_name(name):
            raise m.Malformed(f"{what}: client name {name[:64]!r} cannot be a topic level")
        request_id = m.field(msg, "request_id", str, what)[:64]
        histogram = msg.get("label_histogram", [])
        profile = msg.get("profile", {})
        if not isinstance(histogram, list) or not all(isinstance(n, int) and n >= 0 for n in histogram):
            raise m.Malformed(f"{what}: label_histogram must be a list of counts")
        if not isinstance(profile, dict):
            raise m.Malformed(f"{what}: profile must be an object")
        request = RegisterRequest(name=name, tier=m.field(msg, "tier", str, what), profile=profile,
                                  num_samples=m.field(msg, "num_samples", int, what),
                                  label_histogram=tuple(histogram),
                                  protocol_version=int(msg.get("protocol_version", PROTOCOL_VERSION)))
        try:
            reg = self.coordinator.register(str(msg.get("enrolment_token", "")), request)
        except Refused as exc:
            self._refuse(name, "register", exc, request_id=request_id)
            raise
        self._names[name] = reg.client_id
        self._published_tasks.pop(name, None)
        self._reply(name, {"op": "register", "ok": True, "request_id": request_id, "client_id": reg.client_id,
                           "token": reg.token, "tier": reg.tier, "tier_reason": reg.tier_reason,
                           "config_yaml": reg.config_yaml, "federation": reg.federation,
                           "heartbeat_interval_s": reg.heartbeat_interval_s})
        self._publish_task(name)

    def _client(self, name: str, message: dict, op: str, what: str) -> Client:
        """The client whose token the message carries, which must be the one whose topic it came on."""
        try:
            client = self.coordinator.authenticate(str(message.get("token", "")))
        except Refused as exc:
            # A device this aggregator has never heard of (it lost its state) is told to register
            # again, at most every few seconds. A known name with a wrong token is a forgery or a
            # stale token: its device is not disturbed.
            now = time.monotonic()
            known = any(c.name == name for c in list(self.coordinator.clients.values()))
            if not known and now - self._told_unknown.get(name, -math.inf) > UNKNOWN_REPLY_EVERY_S:
                self._told_unknown[name] = now
                self._refuse(name, op, exc)
            raise
        if client.name != name:
            raise m.Malformed(f"{what}: mis-addressed: the token is client {client.client_id}'s ({client.name}), "
                              f"the topic is {name}'s")
        if self._names.get(name) != client.client_id:  # registered before this aggregator (re)started
            self._names[name] = client.client_id
            self._publish_task(name)
        return client

    # ------------------------------------------------------------------ liveness
    def _status(self, name: str, payload: bytes) -> None:
        what = "status"
        msg = m.decode_json(payload, what)
        if msg.get("status") == "offline":  # the client's last will: no token (set before it registered)
            client_id = self._names.get(name)
            if client_id is not None:
                self.coordinator.disconnected(self.coordinator.clients[client_id], "its MQTT connection dropped")
            return
        client = self._client(name, msg, "heartbeat", what)
        self.coordinator.heartbeat(client)

    # ------------------------------------------------------------------ uploads
    def _result(self, name: str, payload: bytes) -> None:
        what = "result chunk"
        msg, data = m.decode_frame(payload, what)
        client = self._client(name, msg, "upload", what)
        header = _header_of(msg, what)
        index, count = m.field(msg, "index", int, what), m.field(msg, "count", int, what)
        if header.size < 0 or count != max(1, math.ceil(header.size / CHUNK_BYTES)) or not 0 <= index < count:
            raise m.Malformed(f"{what}: chunk {index} of {count} does not fit an upload of {header.size} bytes")
        key = (client.client_id, header.round)
        verdict = {"op": "upload", "round": header.round, "attempt": str(msg.get("attempt", ""))[:32]}
        if self._counted.get(key) == header.sha256:  # a resend of a counted upload
            if index == count - 1:
                self._reply(name, {**verdict, "ok": True, "message": f"round {header.round}: already counted"})
            return
        upload = self._uploads.get(client.client_id)
        if upload is None or upload.header != header:
            try:
                self.coordinator.check_header(client, header)
            except Refused as exc:
                self._uploads.pop(client.client_id, None)
                if index == count - 1 or index == 0:  # once or twice per upload, not once per chunk
                    self._refuse(name, "upload", exc, **verdict)
                raise
            upload = self._uploads[client.client_id] = _Upload(header, count)
        expected = min(CHUNK_BYTES, header.size - index * CHUNK_BYTES)
        if len(data) != expected:
            raise m.Malformed(f"{what}: chunk {index} has {len(data):,} bytes, {expected:,} expected (truncated?)")
        self.coordinator.touch(client)
        upload.parts.setdefault(index, bytes(data))  # a redelivered chunk counts once
        if len(upload.parts) < count:
            return
        del self._uploads[client.client_id]
        body = b"".join(upload.parts[i] for i in range(count))
        try:
            self.coordinator.submit(client, header, body)
        except Refused as exc:
            self._refuse(name, "upload", exc, **verdict)
            raise
        self._counted[key] = header.sha256
        self._reply(name, {**verdict, "ok": True, "message": f"round {header.round}: {header.name} accepted"})

    # ------------------------------------------------------------------ what the aggregator pushes
    def _on_event(self, event: str) -> None:
        if event == "connected":  # the broker may be new: everything retained is published again
            self.connection.publish(self.topics.aggregator_status,
                                    m.encode_json({"status": "online", "protocol_version": PROTOCOL_VERSION}),
                                    retain=True)
            self._published_chunks.clear()
            self._published_tasks.clear()
        if event in ("connected", "round_opened"):
            self._publish_artifacts()
        if event == "round_opened":
            # Partial uploads are of a closed round; counted ones of the open round's number were
            # counted in an abandoned run of it, which is being run again: forget both.
            open_round = self.coordinator.open_artifacts()[0]
            self._counted = {k: v for k, v in self._counted.items() if open_round - 2 <= k[1] < open_round}
            self._uploads = {}
        for name in list(self._names):
            self._publish_task(name)

    def _publish_task(self, name: str) -> None:
        client = self.coordinator.clients.get(self._names[name])
        if client is None or client.name != name:
            return
        task = self.coordinator.task_for(client)
        key = (task.status, task.round, self.coordinator.round_started.get(task.round), task.artifacts)
        if self._published_tasks.get(name) == key:
            return
        self._published_tasks[name] = key
        self._serial += 1
        self.connection.publish(self.topics.client(name, "task"),
                                m.encode_json(task_message(task, f"{self._session}:{self._serial}")), retain=True)

    def _publish_artifacts(self) -> None:
        number, artifacts, refs = self.coordinator.open_artifacts()
        if not number:
            return
        current: dict[str, int] = {}
        for tier, named in artifacts.items():
            for ref in refs[tier]:
                if ref.sha256 in current:
                    continue
                data = named[ref.name]
                pieces = list(chunks(data)) or [memoryview(b"")]
                current[ref.sha256] = len(pieces)
                if ref.sha256 in self._published_chunks:
                    continue
                for index, piece in enumerate(pieces):
                    header = {"sha256": ref.sha256, "name": ref.name, "size": ref.size, "index": index,
                              "count": len(pieces)}
                    self.connection.publish(self.topics.chunk(ref.sha256, index), m.encode_frame(header, piece),
                                            retain=True)
        for sha, count in self._published_chunks.items():  # forget what is no longer current
            if sha not in current:
                for index in range(count):
                    self.connection.publish(self.topics.chunk(sha, index), b"", retain=True)
        self._published_chunks = current
        self.connection.publish(self.topics.current, m.encode_json({
            "round": number,
            "tiers": {tier: [{"name": r.name, "size": r.size, "sha256": r.sha256} for r in tier_refs]
                      for tier, tier_refs in refs.items()}}), retain=True)
