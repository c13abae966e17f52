"""The client side of the MQTT transport: the runtime's calls over a broker (topics in gefl/mqtt.py).

The aggregator pushes, the client waits: its task arrives as a retained message on its task
topic (at once, after a late start or a reconnection) and the artifacts as retained chunks
addressed by their sha256. Requests go out as messages and their answers come back on the
client's reply topic. A broker that is away is `Unavailable` (the runtime backs off and retries);
an upload resent after a reconnection is counted once by the aggregator, which answers "already
counted". Torch-free.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from collections.abc import Callable

from gefl.edge_client.transport import Unauthenticated, Unavailable

from gefl import mqtt as m
from gefl.errors import GeflError
from gefl.protocol import (
    FINISHED,
    TRAIN,
    WAIT,
    ArtifactRef,
    Refused,
    RegisterRequest,
    Registration,
    TaskInfo,
    UploadHeader,
)
from gefl.wire import CHUNK_BYTES, chunks, sha256

REPLY_TIMEOUT_S = 30.0
"""How long a registration or an upload's verdict may take before the request is sent again."""
TRANSFER_TIMEOUT_S = 600.0
DISCOVERY_S = 1.0


def _task_of(message: dict) -> tuple[str, TaskInfo]:
    what = "task"
    status = m.field(message, "status", str, what)
    if status not in (WAIT, TRAIN, FINISHED):
        raise m.Malformed(f"task: unknown status {status!r}")
    refs = message.get("artifacts", [])
    if not isinstance(refs, list):
        raise m.Malformed("task: artifacts must be a list")
    artifacts = tuple(ArtifactRef(m.field(a, "name", str, what), m.field(a, "size", int, what),
                                  m.field(a, "sha256", str, what)) for a in refs if isinstance(a, dict))
    if len(artifacts) != len(refs):
        raise m.Malformed("task: an artifact entry is not an object")
    return m.field(message, "id", str, what), TaskInfo(
        status, m.field(message, "round", int, what), m.field(message, "phase", str, what),
        m.field(message, "tier", str, what), m.field(message, "seed", int, what), artifacts,
        m.field(message, "upload_name", str, what), m.field(message, "max_upload_bytes", int, what),
        float(m.field(message, "deadline_s", (int, float), what)))


class _Download:
    def __init__(self, ref: ArtifactRef) -> None:
        self.ref = ref
        self.count = max(1, math.ceil(ref.size / CHUNK_BYTES))
        self.parts: dict[int, bytes] = {}


class MqttClientTransport:
    def __init__(self, url: m.BrokerUrl, enrol_token: str, auth: m.MqttAuth,
                 say: Callable[[str], None] = print) -> None:
        self.url, self.auth, self.say = url, auth, say
        self.address = str(url)
        self.enrol_token = enrol_token
        self.token = ""
        self.name = ""
        self.topics: m.Topics | None = None
        self.connection: m.Connection | None = None
        self._cond = threading.Condition()
        self._task: tuple[str, TaskInfo] | None = None
        self._taken: str | None = None
        self._replies: list[dict] = []
        self._downloads: dict[str, _Download] = {}
        self._unauthenticated = False
        self._finished = False

    # ------------------------------------------------------------------ connection
    def _connect(self, name: str) -> m.Connection:
        if self.connection is not None:
            if name != self.name:
                raise GeflError(f"this transport is {self.name}'s; it cannot register {name}")
            return self.connection
        self.name = name
        federation = self.url.federation or self._discover()
        self.topics = m.Topics(federation)
        self.address = str(m.BrokerUrl(self.url.host, self.url.port, self.url.tls, federation))
        offline = (self.topics.client(name, "status"), m.encode_json({"status": "offline"}), False)
        self.connection = m.Connection(self.url, f"gefl-{federation}-{name}", self.auth, on_message=self._on_message,
                                       on_connect=self._on_connect, will=offline, say=self.say)
        self.connection.start()
        return self.connection

    def _discover(self) -> str:
        """The federation an aggregator announces on this broker, when the URL does not name one."""
        found: dict[str, str] = {}

        def seen(message) -> None:
            with contextlib.suppress(m.Malformed):
                found[message.topic.split("/")[1]] = m.decode_json(message.payload, "status").get("status", "")

        probe = m.Connection(self.url, f"gefl-discover-{secrets.token_hex(4)}", self.auth, on_message=seen,
                             on_connect=lambda: probe.subscribe("gefl/+/aggregator/status"), say=self.say)
        probe.start()
        try:
            if not probe.wait_connected(REPLY_TIMEOUT_S):
                raise Unavailable(f"cannot reach the MQTT broker {self.url}")
            time.sleep(DISCOVERY_S)  # retained messages arrive right after subscribing
        finally:
            probe.close()
        online = sorted(f for f, status in found.items() if status == "online")
        if len(online) == 1:
            return online[0]
        if not online:
            raise Unavailable(f"no aggregator is online on {self.url} yet (put the federation in the URL, "
                              "mqtt://HOST:PORT/FEDERATION, to wait for a particular one)")
        raise GeflError(f"{len(online)} federations are served on {self.url}: {', '.join(online)}; name one in the "
                        "URL (mqtt://HOST:PORT/FEDERATION)")

    def _on_connect(self) -> None:
        assert self.connection is not None and self.topics is not None
        t = self.topics
        self.connection.subscribe(t.client(self.name, "task"), t.client(self.name, "reply"),
                                  *(t.chunks(sha) for sha in self._downloads))

    def _on_message(self, message) -> None:
        t = self.topics
        assert t is not None
        try:
            if message.topic == t.client(self.name, "task"):
                task_id, task = _task_of(m.decode_json(message.payload, "task"))
                with self._cond:
                    self._task = (task_id, task)
                    self._finished = self._finished or task.status == FINISHED
                    self._cond.notify_all()
            elif message.topic == t.client(self.name, "reply"):
                reply = m.decode_json(message.payload, "reply")
                with self._cond:
                    forgotten = reply.get("code") == "UNAUTHENTICATED" and "request_id" not in reply
                    self._unauthenticated = self._unauthenticated or forgotten
                    self._replies.append(reply)
                    del self._replies[:-64]
                    self._cond.notify_all()
            else:
                self._on_chunk(message.topic, message.payload)
        except m.Malformed as exc:
            self.say(f"mqtt: dropped a message on {message.topic}: {exc}")

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained chunk being cleared
            return
        header, data = m.decode_frame(payload, "artifact chunk")
        sha, index = m.field(header, "sha256", str, "artifact chunk"), m.field(header, "index", int, "artifact chunk")
        with self._cond:
            download = self._downloads.get(sha)
            if download is None or topic != self.topics.chunk(sha, index) or not 0 <= index < download.count:
                return
            download.parts.setdefault(index, bytes(data))
            self._cond.notify_all()

    def _wait_connected(self, what: str, timeout: float = REPLY_TIMEOUT_S) -> m.Connection:
        connection = self.connection
        if connection is None:
            raise GeflError(f"{what}: register first")
        if not connection.wait_connected(timeout):
            raise Unavailable(f"{what}: the MQTT broker {self.url} is unreachable")
        return connection

    def _await_reply(self, match: Callable[[dict], bool], timeout: float, what: str, generation: int) -> dict:
        """The first reply `match` accepts; Unavailable when the connection it was asked on is gone (the
        request may be lost with the broker: the runtime sends it again) or on timeout."""
        until = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.connection is not None and self.connection.generation != generation:
                    raise Unavailable(f"{what}: the connection to {self.url} was lost before the answer came")
                for reply in self._replies:
                    if match(reply):
                        self._replies.remove(reply)
                        return reply
                left = until - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"{what}: no answer from the aggregator within {timeout:.0f} s (is it "
                                      f"connected to {self.url}? does the broker let this client read "
                                      f"{self.topics.client(self.name, 'reply') if self.topics else 'its reply topic'}"
                                      "?)")
                self._cond.wait(min(left, 0.5))

    @staticmethod
    def _refusal(reply: dict, what: str) -> Refused:
        code, message = str(reply.get("code", "INVALID_ARGUMENT")), str(reply.get("message", "refused"))
        cls = Unauthenticated if code == "UNAUTHENTICATED" else Refused
        return cls(code, f"{what}: {message}")

    def _publish(self, connection: m.Connection, topic: str, payload: bytes, what: str) -> None:
        info = connection.publish(topic, payload)
        if info.rc != 0:
            raise Unavailable(f"{what}: the MQTT broker {self.url} is unreachable (publish: rc {info.rc})")

    # ------------------------------------------------------------------ the transport interface
    def register(self, request: RegisterRequest) -> Registration:
        connection = self._connect(request.name)
        self._wait_connected("register")
        generation = connection.generation
        request_id = secrets.token_hex(8)
        assert self.topics is not None
        self._publish(connection, self.topics.register, m.encode_json({
            "request_id": request_id, "enrolment_token": self.enrol_token, "protocol_version": request.protocol_version,
            "name": request.name, "tier": request.tier, "profile": request.profile, "num_samples": request.num_samples,
            "label_histogram": list(request.label_histogram)}), "register")
        reply = self._await_reply(lambda r: r.get("request_id") == request_id, REPLY_TIMEOUT_S, "register",
                                   generation)
        if not reply.get("ok"):
            raise self._refusal(reply, "register")
        what = "registration reply"
        self.token = m.field(reply, "token", str, what)
        with self._cond:
            self._unauthenticated = False
        return Registration(m.field(reply, "client_id", int, what), self.token, m.field(reply, "tier", str, what),
                            m.field(reply, "tier_reason", str, what), m.field(reply, "config_yaml", str, what),
                            m.field(reply, "federation", str, what),
                            float(m.field(reply, "heartbeat_interval_s", (int, float), what)))

    def fetch_task(self, wait_s: float) -> TaskInfo:
        until = time.monotonic() + wait_s
        with self._cond:
            while True:
                if self._unauthenticated:
                    self._unauthenticated = False
                    raise Unauthenticated("UNAUTHENTICATED", "the aggregator does not know this client's token")
                if self._task is not None:
                    task_id, task = self._task
                    if task.status == FINISHED:
                        return task
                    if task.status == TRAIN and task_id != self._taken:
                        self._taken = task_id
                        return task
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        self._wait_connected("fetch task", 0.0 if self.connection and self.connection.connected.is_set() else 5.0)
        return TaskInfo(WAIT)

    def download(self, round_number: int, ref: ArtifactRef) -> bytearray:
        connection = self._wait_connected(f"download {ref.name}")
        assert self.topics is not None
        download = _Download(ref)
        until = time.monotonic() + TRANSFER_TIMEOUT_S
        with self._cond:
            self._downloads[ref.sha256] = download
        connection.subscribe(self.topics.chunks(ref.sha256))
        try:
            with self._cond:
                while len(download.parts) < download.count:
                    current = self._task[1] if self._task else None
                    if current is not None and (current.status != TRAIN or current.round != round_number):
                        raise Refused("FAILED_PRECONDITION", f"download {ref.name}: round {round_number} closed "
                                      "before its artifacts arrived")
                    if time.monotonic() > until:
                        raise Unavailable(f"download {ref.name}: not all of it arrived within "
                                          f"{TRANSFER_TIMEOUT_S:.0f} s")
                    self._cond.wait(0.5)
        finally:
            with self._cond:
                self._downloads.pop(ref.sha256, None)
            connection.unsubscribe(self.topics.chunks(ref.sha256))
        data = bytearray(b"".join(download.parts[i] for i in range(download.count)))
        if len(data) != ref.size or sha256(data) != ref.sha256:
            raise Refused("DATA_LOSS", f"download {ref.name}: {len(data):,} bytes whose sha256 does not match the "
                          "task's; corrupted in transit")
        return data

    def upload(self, header: UploadHeader, payload: bytes) -> str:
        what = f"upload {header.name} for round {header.round}"
        connection = self._wait_connected(what)
        generation = connection.generation
        assert self.topics is not None
        attempt = secrets.token_hex(8)  # the verdict names it: an answer to an earlier attempt never matches
        meta = {"token": self.token, "attempt": attempt, "round": header.round, "phase": header.phase,
                "name": header.name, "size": header.size, "sha256": header.sha256, "num_samples": header.num_samples,
                "loss": header.loss}
        pieces = list(chunks(payload)) or [memoryview(b"")]
        topic = self.topics.client(self.name, "result")
        for index, piece in enumerate(pieces):
            frame = m.encode_frame({**meta, "index": index, "count": len(pieces)}, piece)
            self._publish(connection, topic, frame, what)
        reply = self._await_reply(lambda r: r.get("op") == "upload" and r.get("attempt") == attempt,
                                  REPLY_TIMEOUT_S, what, generation)
        if not reply.get("ok"):
            raise self._refusal(reply, what)
        return str(reply.get("message", "accepted"))

    def heartbeats(self, interval_s: float, stop: threading.Event,
                   on_reply: Callable[[int, bool], None] | None = None) -> None:
        topic = self.topics.client(self.name, "status") if self.topics else ""
        while not stop.is_set() and not self._finished:
            if self.connection is not None and self.connection.connected.is_set():
                self.connection.publish(topic, m.encode_json({"status": "alive", "token": self.token}), qos=0)
            stop.wait(interval_s)

    def close(self) -> None:
        if self.connection is not None and self.topics is not None:
            self.connection.close((self.topics.client(self.name, "status"), m.encode_json({"status": "offline"}),
                                   False))
