"""The aggregator's MQTT face: the same Coordinator as the gRPC service, over a broker.

The bridge subscribes to every client's register, result and status topics (gefl/protocol/mqtt.py lists
them) and pushes what gRPC clients would poll for: each MQTT client's task as a sealed, retained
message, and the open round's artifacts as retained, content-addressed chunks, republished after
every reconnection because a restarted broker may have forgotten them. Messages are handled one
at a time on a worker thread, off paho's network thread, so a large upload being checked never
stalls the connection.

A broker without an ACL lets anyone publish on any topic, so every message is checked before it
touches anything: size and nesting before parsing, the token on every chunk and heartbeat, the
topic's client name against the token's (and against a registration's body), the MAC of an
offline message against the session the client last announced, then the coordinator's own
checks. A bad one is dropped with a log line and, when its sender can be told, a sealed refusal
on its reply topic. Upload chunks are collected by (client, round, chunk index), so QoS 1
redeliveries and a client resending after a reconnect count once; a resent upload that was
already counted is answered "already counted", not refused.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

from gefl.aggregator.coordinator import Client, Coordinator

from gefl.errors import GeflError
from gefl.protocol import (
    DATA_LOSS,
    INVALID_ARGUMENT,
    PROTOCOL_VERSION,
    RESOURCE_EXHAUSTED,
    Refused,
    RegisterRequest,
    TaskInfo,
    UploadHeader,
)
from gefl.protocol import mqtt as m
from gefl.protocol.wire import CHUNK_BYTES, chunks, sha256

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
"""Messages waiting for the worker; when full, paho's thread waits (back-pressure on the broker)."""
UNKNOWN_REPLY_EVERY_S = 5.0
TASK_RESEND_EVERY_S = 5.0
"""A client whose heartbeat names another task than its latest gets that task again, at most this
often: a retained task can be lost with a broker, or overwritten by anyone a broker without an ACL
lets publish there."""
SUBSCRIBE_TIMEOUT_S = 10.0


@dataclass
class _Upload:
    header: UploadHeader
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Published:
    key: tuple
    task_id: str
    payload: bytes
    resent: float = -math.inf


def _header_of(message: dict, what: str) -> UploadHeader:
    return UploadHeader(
        m.field(message, "round", int, what), m.field(message, "phase", str, what), m.field(message, "name", str, what),
        m.field(message, "size", int, what), m.field(message, "sha256", str, what),
        m.field(message, "num_samples", int, what), float(m.field(message, "loss", (int, float), what)))


def chunk_hashes(data: bytes) -> list[str]:
    """The sha256 of each chunk of `data`, as the task lists them for the client to check each chunk by."""
    return [sha256(piece) for piece in chunks(data)]


def task_message(task: TaskInfo, task_id: str, hashes: dict[str, list[str]] | None = None) -> dict:
    """The task as JSON; `hashes` (artifact sha256 -> its chunks' sha256) lets the client check every
    chunk on its own, so a forged chunk on a shared artifact topic is dropped instead of spoiling the
    download."""
    return {"id": task_id, "status": task.status, "round": task.round, "phase": task.phase, "tier": task.tier,
            "seed": task.seed, "upload_name": task.upload_name, "max_upload_bytes": task.max_upload_bytes,
            "deadline_s": task.deadline_s,
            "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256,
                           "chunks": (hashes or {}).get(a.sha256, [])} for a in task.artifacts]}


class MqttBridge:
    def __init__(self, coordinator: Coordinator, url: m.BrokerUrl, auth: m.MqttAuth) -> None:
        self.coordinator = coordinator
        self._log_drop = m.LogLimiter(log)
        self.topics = m.Topics(m.check_federation(url.federation or coordinator.admission.federation))
        self.url = m.BrokerUrl(url.host, url.port, url.tls, self.topics.federation)
        self._session = secrets.token_hex(4)
        """Task ids are session:serial, so a client never mistakes a new task for one it has done,
        even when a restarted aggregator numbers from 1 again."""
        self._serial = 0
        self._names: dict[str, int] = {}  # MQTT clients: name -> client id
        self._published_tasks: dict[str, _Published] = {}
        self._published_chunks: dict[str, int] = {}  # sha256 -> chunk count, retained in the broker
        self._chunk_hashes: dict[str, list[str]] = {}  # sha256 of an open artifact -> its chunks' sha256
        self._uploads: dict[int, _Upload] = {}  # client id -> the upload being collected
        self._counted: dict[tuple[int, int], str] = {}  # (client id, round) -> sha256 counted
        self._refused_attempt: dict[int, str] = {}  # client id -> the last upload attempt it was told was refused
        self._sessions: dict[int, str] = {}  # client id -> the session its last heartbeat announced
        self._chunks_resent: dict[tuple[str, int], float] = {}  # (sha256, index) -> when last resent
        self._told_unknown: dict[str, float] = {}
        self.dropped = 0
        """Messages dropped as malformed, mis-addressed, forged or refused (the tests read it)."""
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="gefl-mqtt-bridge", daemon=True)
        offline = (self.topics.aggregator_status, m.encode_json({"status": "offline"}), True)
        self.connection = m.Connection(self.url, f"gefl-aggregator-{self.topics.federation}-{self._session}", auth,
                                       on_message=self._enqueue, on_connect=self._on_connect, will=offline)
        self._offline = offline
        coordinator.add_listener(lambda event: self._enqueue(("event", event)))

    def _enqueue(self, item: object) -> None:
        """Hand a message or event to the worker; once stopping, drop it. The queue is bounded, so a put
        blocks while it is full: after the worker's last item nobody would empty it, and paho's network
        thread, blocked there, could neither send the last round's tasks nor let close() join it (with
        1000 clients' heartbeats arriving, that deadlocked every run's end)."""
        if not self._stopping:
            self._queue.put(item)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        t = self.topics
        return t.every_client("register"), t.every_client("result"), t.every_client("status")

    @property
    def publish_failures(self) -> int:
        return self.connection.publish_failures

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        """Connect, and check that the broker let every subscription through: a broker whose ACL
        keeps the aggregator from reading, say, the status topics would have it take every client
        for dead, so that is an error here, naming the topic, not a mystery later."""
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
        answered = self.connection.wait_subscribed(min(timeout, SUBSCRIBE_TIMEOUT_S))
        refused = list(self.connection.refused_subscriptions)
        if refused or not answered:
            self.stop()
            what = (f"refused the aggregator's subscription to {', '.join(refused)}" if refused
                    else f"did not answer the aggregator's subscriptions within {SUBSCRIBE_TIMEOUT_S:.0f} s")
            raise GeflError(f"the MQTT broker {self.url} {what}: give the aggregator's MQTT user read access to "
                            f"{', '.join(self.subscriptions)} in the broker's ACL (configs/mosquitto/acl shows how)")

    def stop(self) -> None:
        """Publish what is queued (the last round's "finished" tasks above all: a client that misses its
        own waits for a task forever), then the offline status, then disconnect. What arrives from here
        on is dropped: it could not be answered anyway."""
        self._stopping = True
        self._queue.put(("stop", ""))
        self._worker.join(60)
        self.connection.close(self._offline)

    def _on_connect(self) -> None:
        """After every (re)connection: subscribe, and have the worker republish the retained state."""
        self.connection.subscribe(*self.subscriptions)
        self._enqueue(("event", "connected"))

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:  # until the "stop" item, after everything queued before it
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
                log.exception(f"mqtt: dropped a message: unexpected {exc!r}")

    def _drop(self, topic: str, why: str) -> None:
        self.dropped += 1
        self._log_drop(topic, f"mqtt: dropped a message on {topic}: {why}")

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            name, kind = self.topics.client_of(topic)
            if kind == "register":
                self._register(name, payload)
            elif kind == "result":
                self._result(name, payload)
            elif kind == "status":
                self._status(name, payload)
            else:
                raise m.Malformed(f"{kind!r} is not a topic the aggregator reads")
        except m.Malformed as exc:
            self._drop(topic, str(exc))
        except Refused as exc:
            self._drop(topic, f"refused [{exc.code}]: {exc}")

    def _reply(self, name: str, key: bytes, message: dict) -> None:
        """A sealed answer on the client's reply topic, keyed with the secret its request carried."""
        topic = self.topics.client(name, "reply")
        self.connection.publish(topic, m.seal(key, topic, message))

    def _refuse(self, name: str, key: bytes, exc: Refused, **fields) -> None:
        """`fields` name what is refused: op, and request_id or round and attempt."""
        self._reply(name, key, {**fields, "ok": False, "code": exc.code, "message": str(exc)})

    # ------------------------------------------------------------------ registration
    def _register(self, name: str, payload: bytes) -> None:
        what = "registration"
        msg = m.decode_json(payload, what)
        request_id = m.field(msg, "request_id", str, what)[:64]
        enrol_token = str(msg.get("enrolment_token", ""))
        key = m.key_of(enrol_token)  # the client has no token of its own yet
        try:
            body_name = m.field(msg, "name", str, what)
            if body_name != name:
                raise Refused(INVALID_ARGUMENT, f"the registration on {name}'s topic names {body_name[:64]!r}: a "
                              "device registers on its own topic, client/<its name>/register")
            histogram = msg.get("label_histogram", [])
            profile = msg.get("profile", {})
            if not isinstance(histogram, list) or not all(isinstance(n, int) and n >= 0 for n in histogram):
                raise m.Malformed(f"{what}: label_histogram must be a list of counts")
            if not isinstance(profile, dict):
                raise m.Malformed(f"{what}: profile must be an object")
            version = msg.get("protocol_version", PROTOCOL_VERSION)
            if not isinstance(version, int) or isinstance(version, bool):
                raise m.Malformed(f"{what}: protocol_version must be an integer")
            request = RegisterRequest(name=name, tier=m.field(msg, "tier", str, what), profile=profile,
                                      num_samples=m.field(msg, "num_samples", int, what),
                                      label_histogram=tuple(histogram), protocol_version=version,
                                      credential=str(msg.get("credential", ""))[:256])
            reg = self.coordinator.register(enrol_token, request, transport="MQTT")
        except m.Malformed as exc:
            self._refuse(name, key, Refused(INVALID_ARGUMENT, str(exc)), op="register", request_id=request_id)
            raise
        except Refused as exc:
            self._refuse(name, key, exc, op="register", request_id=request_id)
            raise
        self._names[name] = reg.client_id
        self._published_tasks.pop(name, None)
        self._sessions.pop(reg.client_id, None)  # a new connection (and session) follows
        self._reply(name, key, {"op": "register", "ok": True, "request_id": request_id, "client_id": reg.client_id,
                                "token": reg.token, "tier": reg.tier, "tier_reason": reg.tier_reason,
                                "config_yaml": reg.config_yaml, "federation": reg.federation,
                                "heartbeat_interval_s": reg.heartbeat_interval_s})
        self._publish_task(name)

    def _client(self, name: str, message: dict, what: str, **answer) -> tuple[Client, bytes]:
        """The client whose token the message carries, which must be the one whose topic it came on,
        and the key its replies are sealed with; `answer` names the request in a refusal (op, and
        for an upload its round and attempt, which the client waits on)."""
        token = str(message.get("token", ""))
        try:
            client = self.coordinator.authenticate(token)
        except Refused as exc:
            # A device this aggregator has never heard of (it lost its state) is told to register
            # again, at most every few seconds. A known name with a wrong token is a forgery or a
            # stale token: its device is not disturbed.
            now = time.monotonic()
            known = any(c.name == name for c in list(self.coordinator.clients.values()))
            if not known and now - self._told_unknown.get(name, -math.inf) > UNKNOWN_REPLY_EVERY_S:
                self._told_unknown[name] = now
                self._refuse(name, m.key_of(token), exc, **answer)
            raise
        if client.name != name:
            raise m.Malformed(f"{what}: mis-addressed: the token is client {client.client_id}'s ({client.name}), "
                              f"the topic is {name}'s")
        if self._names.get(name) != client.client_id:  # registered before this aggregator (re)started
            self._names[name] = client.client_id
            self._publish_task(name)
        return client, m.key_of_sha256(client.token_sha256)

    # ------------------------------------------------------------------ liveness
    def _status(self, name: str, payload: bytes) -> None:
        what = "status"
        msg = m.decode_json(payload, what)
        if msg.get("status") == "offline":
            self._offline_message(name, msg)
            return
        client, _ = self._client(name, msg, what, op="heartbeat")
        session = msg.get("session")
        if m.valid_session(session):
            self._sessions[client.client_id] = session
        self.coordinator.heartbeat(client)
        published = self._published_tasks.get(name)
        now = time.monotonic()
        if (published is not None and msg.get("task") != published.task_id
                and now - published.resent > TASK_RESEND_EVERY_S):
            published.resent = now  # the same task, the same id: a client that has it ignores it
            self.connection.publish(self.topics.client(name, "task"), published.payload, retain=True)
        missing = msg.get("missing")
        if isinstance(missing, list):
            self._resend_chunks(missing[:4], now)

    def _resend_chunks(self, missing: list, now: float) -> None:
        """Publish again the chunks of an open artifact that a client says it has been missing, each
        at most every TASK_RESEND_EVERY_S however many clients ask (a forged or wiped retained chunk
        would otherwise stall every download of it)."""
        number, artifacts, refs = self.coordinator.open_artifacts()
        for entry in missing:
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            indices = entry.get("chunks") if isinstance(entry, dict) else None
            if not number or not isinstance(sha, str) or sha not in self._published_chunks \
                    or not isinstance(indices, list):
                continue
            found = next(((tier, r) for tier, tier_refs in refs.items() for r in tier_refs if r.sha256 == sha), None)
            if found is None or found[1].name not in artifacts.get(found[0], {}):
                continue
            ref, data = found[1], artifacts[found[0]][found[1].name]
            count = self._published_chunks[sha]
            for index in indices[:64]:
                if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count
                        or now - self._chunks_resent.get((sha, index), -math.inf) < TASK_RESEND_EVERY_S):
                    continue
                self._chunks_resent[(sha, index)] = now
                piece = memoryview(data)[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
                header = {"sha256": sha, "name": ref.name, "size": ref.size, "index": index, "count": count}
                self.connection.publish(self.topics.chunk(sha, index), m.encode_frame(header, piece), retain=True)

    def _offline_message(self, name: str, msg: dict) -> None:
        """A client's last will (or last words): honoured only with a valid MAC for the session the
        client's own heartbeats announced last, and once: anyone may publish on a status topic of
        a broker without an ACL, and a will of an earlier connection may be replayed."""
        client_id = next((c.client_id for c in list(self.coordinator.clients.values()) if c.name == name), None)
        session = self._sessions.get(client_id) if client_id is not None else None
        if client_id is None or session is None:
            raise m.Forged(f"offline message for {name}, which has announced no session: ignored")
        client = self.coordinator.clients[client_id]
        if not m.offline_is_genuine(m.key_of_sha256(client.token_sha256), session, name, msg):
            raise m.Forged(f"offline message for {name} without a valid MAC for its current session (forged or "
                           "replayed): ignored")
        del self._sessions[client_id]
        self.coordinator.disconnected(client, "its MQTT connection dropped")

    # ------------------------------------------------------------------ uploads
    def _result(self, name: str, payload: bytes) -> None:
        what = "result chunk"
        msg, data = m.decode_frame(payload, what)
        verdict = {"op": "upload", "round": msg.get("round") if isinstance(msg.get("round"), int) else 0,
                   "attempt": str(msg.get("attempt", ""))[:32]}
        client, key = self._client(name, msg, what, **verdict)
        try:
            self._chunk(client, key, name, msg, data, verdict)
        except m.Malformed as exc:  # from a client that proved who it is: tell it, as gRPC would
            self._uploads.pop(client.client_id, None)
            refusal = Refused(INVALID_ARGUMENT, str(exc))
            self.coordinator.log_refusal(client, verdict["round"], refusal)
            self._refuse_once(client, name, key, refusal, verdict)
            raise
        except Refused as exc:
            self._uploads.pop(client.client_id, None)
            if not exc.logged:
                self.coordinator.log_refusal(client, verdict["round"], exc)
            self._refuse_once(client, name, key, exc, verdict)
            raise

    def _refuse_once(self, client: Client, name: str, key: bytes, exc: Refused, verdict: dict) -> None:
        """One refusal per upload attempt, however many of its chunks are refused."""
        if self._refused_attempt.get(client.client_id) != verdict["attempt"]:
            self._refused_attempt[client.client_id] = verdict["attempt"]
            self._refuse(name, key, exc, **verdict)

    def _chunk(self, client: Client, key: bytes, name: str, msg: dict, data: bytes, verdict: dict) -> None:
        what = "result chunk"
        header = _header_of(msg, what)
        index, count = m.field(msg, "index", int, what), m.field(msg, "count", int, what)
        if header.size < 0 or count != max(1, math.ceil(header.size / CHUNK_BYTES)) or not 0 <= index < count:
            raise m.Malformed(f"{what}: chunk {index} of {count} does not fit an upload of {header.size} bytes")
        counted_key = (client.client_id, header.round)
        if self._counted.get(counted_key) == header.sha256:  # a resend of a counted upload
            if index == count - 1:
                self._reply(name, key, {**verdict, "ok": True, "message": f"round {header.round}: already counted"})
            return
        upload = self._uploads.get(client.client_id)
        if upload is None or upload.header != header:
            self.coordinator.check_header(client, header)
            upload = self._uploads[client.client_id] = _Upload(header, count)
        expected = min(CHUNK_BYTES, header.size - index * CHUNK_BYTES)
        if len(data) < expected:
            raise Refused(DATA_LOSS, f"{what}: chunk {index} has {len(data):,} bytes, {expected:,} expected: "
                          f"truncated, shorter than the {header.size:,} bytes the header announced")
        if len(data) > expected:
            raise Refused(RESOURCE_EXHAUSTED, f"{what}: chunk {index} has {len(data):,} bytes, {expected:,} "
                          f"expected: the upload goes past the {header.size:,} bytes the header announced")
        self.coordinator.touch(client)
        upload.parts.setdefault(index, bytes(data))  # a redelivered chunk counts once
        if len(upload.parts) < count:
            return
        del self._uploads[client.client_id]
        body = b"".join(upload.parts[i] for i in range(count))
        self.coordinator.submit(client, header, body)
        self._counted[counted_key] = header.sha256
        self._reply(name, key, {**verdict, "ok": True, "message": f"round {header.round}: {header.name} accepted"})

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

    def _hashes_for(self, task: TaskInfo) -> dict[str, list[str]] | None:
        """Chunk hashes of the task's artifacts; None if the round has moved on since the task was made
        (a newer task follows)."""
        hashes: dict[str, list[str]] = {}
        for ref in task.artifacts:
            if ref.sha256 not in self._chunk_hashes:
                data = self.coordinator.open_artifacts()[1].get(task.tier, {}).get(ref.name)
                if data is None or len(data) != ref.size or sha256(data) != ref.sha256:
                    return None
                self._chunk_hashes[ref.sha256] = chunk_hashes(data)
            hashes[ref.sha256] = self._chunk_hashes[ref.sha256]
        return hashes

    def _publish_task(self, name: str) -> None:
        client = self.coordinator.clients.get(self._names[name])
        if client is None or client.name != name:
            return
        task = self.coordinator.task_for(client)
        key = (task.status, task.round, self.coordinator.round_started.get(task.round), task.artifacts,
               client.token_sha256)
        published = self._published_tasks.get(name)
        if published is not None and published.key == key:
            return
        hashes = self._hashes_for(task)
        if hashes is None:
            return
        self._serial += 1
        task_id = f"{self._session}:{self._serial}"
        topic = self.topics.client(name, "task")
        payload = m.seal(m.key_of_sha256(client.token_sha256), topic, task_message(task, task_id, hashes))
        self._published_tasks[name] = _Published(key, task_id, payload)
        self.connection.publish(topic, payload, retain=True)

    def _publish_artifacts(self) -> None:
        number, artifacts, refs = self.coordinator.open_artifacts()
        if not number:
            return
        current: dict[str, int] = {}
        hashes: dict[str, list[str]] = {}
        for tier, named in artifacts.items():
            for ref in refs[tier]:
                if ref.sha256 in current:
                    continue
                data = named[ref.name]
                pieces = list(chunks(data)) or [memoryview(b"")]
                current[ref.sha256] = len(pieces)
                hashes[ref.sha256] = self._chunk_hashes.get(ref.sha256) or [sha256(p) for p in pieces]
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
        self._chunk_hashes = hashes
        self._chunks_resent = {k: v for k, v in self._chunks_resent.items() if k[0] in current}
        self.connection.publish(self.topics.current, m.encode_json({
            "round": number,
            "tiers": {tier: [{"name": r.name, "size": r.size, "sha256": r.sha256} for r in tier_refs]
                      for tier, tier_refs in refs.items()}}), retain=True)
