"""Fuzz targets: every decoder that reads bytes from a peer (gRPC, MQTT) or a file from elsewhere.

Each `fuzz_<name>(data)` feeds one input to the real code and states its contract: for any input
the code returns normally or raises one of the project's documented errors (`ALLOWED`:
gefl.errors.GeflError and its subclasses gefl.protocol.mqtt.Malformed, gefl.protocol.Refused, the client's
Unavailable and Unauthenticated). Anything else that escapes (TypeError, KeyError, RecursionError,
OverflowError, MemoryError, ...) is a crash, and so is a call that does not finish (`watchdog`).

The targets need no atheris: benchmarks/fuzz.py runs them under atheris (coverage-guided, with the
gefl modules instrumented), tests/test_fuzz_corpus.py replays the seed corpus and fixed hostile
inputs in plain Python, so the contract is checked on every CI run. Inputs of the structured
targets (several messages, a header and a body, a directory tree) are laid out as the `*_input`
encoders below write them; the runner's --make-corpus builds the seed corpus with those encoders
and the real protocol encoders, so a seed is exactly what a well-behaved peer would send.

Nothing here needs a broker, a server or a network: the MQTT bridge and the client transport run
on a stand-in for their broker connection, the gRPC servicer on a stand-in for its call context,
and the coordinators are real (gefl.aggregator.serve.build_coordinator) on a registered 20-image
dataset, which builds in a second and holds a few MB where Fashion-MNIST takes 5 s and 1.3 GB (the
upload checks never look at the test images). Mutable state that an input may change (a client
registered, an upload counted, a client marked offline) is put back after every input, so each
input is judged on its own and a crash reproduces from its input alone.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import gefl.aggregator.coordinator as coordinator_module
import gefl.edge_client.mqtt_transport as client_mqtt
import numpy as np
from gefl.aggregator.coordinator import Client, Coordinator
from gefl.aggregator.grpc_server import AggregatorService
from gefl.aggregator.mqtt_bridge import MqttBridge, _header_of
from gefl.aggregator.serve import build_coordinator
from gefl.edge_client.mqtt_transport import MqttClientTransport, _Download, _task_of
from gefl.protos import gefl_v1_pb2 as pb
from google.protobuf.message import DecodeError

import gefl
import gefl.rounds.checkpoint as checkpoint_module
from gefl.config import config_from_dict, config_from_yaml
from gefl.data import dataset_classes, list_datasets
from gefl.errors import GeflError
from gefl.image_folder import IMAGE_SUFFIXES, read_image_folder
from gefl.protocol import ArtifactRef, RegisterRequest, UploadHeader
from gefl.protocol import mqtt as m
from gefl.protocol.wire import CHUNK_BYTES, arrays_digest, decode_arrays, decode_state, encode_arrays, sha256
from gefl.rounds.loop import RoundLoop, upload_name
from gefl.rounds.rundir import load_generator

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

ALLOWED: tuple[type[BaseException], ...] = (GeflError,)
"""What a decoder may raise for bad input; the subclasses named in the module docstring included."""

HANG_S = 4.0
"""CPU seconds one input may take before `watchdog` calls it a hang (the slowest seed takes < 0.1 s)."""

ENROL_TOKEN = "fuzz-enrolment-token"
FEDERATION = "fuzz"
"""The model federation's name: its MQTT topics are gefl/fuzz/..."""
NAMES = ("board-0", "board-1")
"""Registered in both federations: board-0 takes part in the open round, board-1 does not."""
TOKENS = ("fuzz-token-0", "fuzz-token-1")
"""Their client tokens (fixed, so the seed corpus can carry them)."""
SAMPLES = 100
"""What each registered client says it trains on."""
REQUEST_ID = "f00dfeedf00dfeed"
"""The request id the client transport puts on its registration (fixed, so a seed reply can match it)."""
DOWNLOAD_SHA = "d" * 64
CHUNK_HASHES = (sha256(bytes(range(256))), sha256(b"\xff" * 64))
"""The per-chunk sha256s of that artifact where a task lists them: the seeds' chunk bodies."""
DOWNLOAD_SIZE = CHUNK_BYTES + CHUNK_BYTES // 2
"""The artifact the client transport is downloading while chunks arrive: two chunks."""

_MINI = "fuzz-mini"
_NETWORK = {"min_clients": 1, "round_timeout": 3600, "heartbeat_timeout": 3600}
MODEL_CONFIG: dict[str, Any] = {
    "name": FEDERATION, "dataset": _MINI, "algorithm": "fedavg", "num_clients": 3, "tiers": ["cnn2"], "rounds": 2,
    "network": _NETWORK}
"""FedAvg on one tier: round 1 takes a model upload."""
GENERATOR_CONFIG: dict[str, Any] = {
    "name": "fuzz-gen", "dataset": _MINI, "algorithm": "gefl-f", "num_clients": 3, "tiers": ["cnn2"], "rounds": 1,
    "gefl": {"warmup_rounds": 1, "generator_rounds": 1, "generator": {
        "family": "cvae-f", "preset": "light", "options": {"widths": [4, 8], "latent": 4, "prior_components": 2}}},
    "network": _NETWORK}
"""GeFL-F with a 14 KB generator and its class prior's statistics: round 2 takes a generator upload."""


# ---------------------------------------------------------------------------------------- plumbing
class Hang(BaseException):  # noqa: N818 - it names what happened, like KeyboardInterrupt
    """An input that ran past HANG_S of CPU time. Raised inside the call, so its traceback shows the
    line that was stuck; a BaseException, so the code's own `except Exception` cannot hide it."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_S) -> Iterator[None]:
    """Turn a hang into a `Hang` exception. CPU time (ITIMER_PROF), not wall time: on a shared,
    loaded machine a slow input is not a hang; and SIGPROF, because libFuzzer owns SIGALRM."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(_signum: int, _frame: Any) -> None:
        raise Hang(f"still running after {seconds:g} s of CPU time")

    previous = signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


PACKAGE_DIRS = ("aggregator", "edge_client", "export", "protos", "configs")
"""The top-level folders that install inside gefl (gefl.aggregator, ...)."""


def repo_path(filename: str) -> Path | None:
    """Where a source file of the project lives in the repository: `filename` under the checkout, or
    under a snapshot of a commit laid out as the wheel installs it ($GEFL_FUZZ_SOURCE, made by
    benchmarks/fuzz.py --commit: gefl/aggregator/x.py there is aggregator/x.py here)."""
    path = Path(filename).resolve()
    with contextlib.suppress(ValueError):
        return path.relative_to(ROOT)
    source = os.environ.get("GEFL_FUZZ_SOURCE")
    if source:
        with contextlib.suppress(ValueError):
            rel = path.relative_to(Path(source).resolve())
            return Path(*rel.parts[1:]) if rel.parts[:1] == ("gefl",) and rel.parts[1:2] and \
                rel.parts[1] in PACKAGE_DIRS else rel
    return None


def _project_file(filename: str) -> str | None:
    """`filename` relative to the repository when it is the project's own code (not this harness)."""
    path = repo_path(filename)
    if path is None:
        return None
    if path.parts[:2] in (("benchmarks", "fuzz"), ("benchmarks", "fuzz.py")) or path.parts[0] in ("tests", ".venv"):
        return None
    return path.as_posix()


def crash_site(exc: BaseException) -> dict[str, Any]:
    """Where a crash happened: the innermost frame of the project's code (else the innermost of all),
    with its source line, and the exception's one-line description."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [(f, rel) for f in frames if (rel := _project_file(f.filename))]
    # Else the harness line that called into the library: stable, where the library's own innermost
    # frame (of a RecursionError, say) differs from input to input.
    here = [(f, f"benchmarks/fuzz/{Path(f.filename).name}") for f in frames if Path(f.filename).parent == HERE]
    frame, rel = (own or here or [(frames[-1], frames[-1].filename) if frames else (None, "?")])[-1]
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    kind = type(exc).__name__ if own else _family(type(exc))
    return {"exception": f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
            "site": f"{rel}:{frame.lineno}" if frame else "?", "code": (frame.line or "").strip() if frame else "",
            "signature": f"{kind}@{rel}:{frame.lineno if frame else 0}"}


def _family(kind: type[BaseException]) -> str:
    """A library's most general exception class above `kind` (yaml's ScannerError, ParserError, ...
    are all YAMLError): the errors a library raises from one call are one crash, not one per subclass."""
    package = kind.__module__.split(".")[0]
    if package == "builtins":
        return kind.__name__
    family = kind
    for cls in kind.__mro__:
        if cls.__module__.split(".")[0] == package:
            family = cls
    return family.__name__


LAST_OUTCOME = ""
"""What the last target call ended with: "ok", or the allowed error (or the dropped message) that
ended it. The tests read it to check that the valid seeds get all the way through."""


def _target(fn: Callable[[bytes], str | None]) -> Callable[[bytes], None]:
    """The contract around one target: an allowed error ends the call normally; anything else escapes.
    The body returns None for "ok", or a description of how a handled input was turned down."""

    @functools.wraps(fn)
    def run(data: bytes) -> None:
        global LAST_OUTCOME
        LAST_OUTCOME = "running"
        try:
            LAST_OUTCOME = fn(bytes(data)) or "ok"
        except ALLOWED as exc:
            LAST_OUTCOME = f"{type(exc).__name__}: {exc}"

    return run


class _Log(logging.Handler):
    """Keeps the last line gefl logged (how a bridge or transport says it dropped a message), and
    nothing else: a fuzz run logs millions of refusals, and a handler on the `gefl` logger keeps
    Python's last-resort handler from printing them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""
        logging.getLogger("gefl").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()

    def __call__(self, line: str) -> None:
        self.last = line


class _Reader:
    """Takes an input apart from the front, like atheris' FuzzedDataProvider but in plain Python (the
    CI replay runs without atheris); past the end it yields zeros and empty bytes, never an error."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "big")

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


@functools.cache
def _tmp() -> Path:
    """This process's scratch directory (under $GEFL_FUZZ_TMP when the runner gives one, so what a
    crashed child leaves behind is removed by the runner)."""
    base = os.environ.get("GEFL_FUZZ_TMP") or None
    path = Path(tempfile.mkdtemp(prefix="gefl-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def _envelope(data: bytes) -> tuple[dict, bytes]:
    """A header and a body, framed like an MQTT chunk (4-byte length, JSON, bytes); an input that is
    not such a frame is all body with an empty header, so every input reaches the code under test."""
    if len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if length <= len(data) - 4:
            with contextlib.suppress(ValueError, RecursionError):
                head = json.loads(data[4:4 + length])
                if isinstance(head, dict):
                    return head, data[4 + length:]
    return {}, data


def envelope_input(header: dict, body: bytes = b"") -> bytes:
    return m.encode_frame(header, body)


# ---------------------------------------------------------------------------------------- federations
def _register_mini_dataset() -> None:
    """20 random 28x28 grayscale images in 10 classes, as `gefl.register_dataset` takes them."""
    if _MINI in list_datasets():
        return
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.int64) % 10
    gefl.register_dataset(_MINI, [f"class-{i}" for i in range(10)], lambda _dir: (images, labels, images, labels),
                          "built by benchmarks/fuzz/targets.py")


class _FixedTokens:
    """Stands in for the coordinator's `secrets` while the harness registers its clients, so their
    tokens are the fixed TOKENS the seed corpus carries."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = iter(tokens)

    def token_urlsafe(self, _nbytes: int | None = None) -> str:
        return next(self._tokens)


class Federation:
    """A real coordinator with board-0 and board-1 registered and one round open (board-0 its only
    participant), put back into exactly that state after every input."""

    def __init__(self, config: dict, first_round: int) -> None:
        _register_mini_dataset()
        self.log = _Log()
        self.coordinator = build_coordinator(config_from_dict(config), _tmp() / config["name"], ENROL_TOKEN)
        self.first_round = first_round
        with mock.patch.object(coordinator_module, "secrets", _FixedTokens(TOKENS)):
            for name in NAMES:
                self.coordinator.register(ENROL_TOKEN, RegisterRequest(
                    name=name, tier="cnn2", num_samples=SAMPLES, label_histogram=(SAMPLES // 10,) * 10))
        self._clients = {i: dataclasses.replace(c) for i, c in self.coordinator.clients.items()}
        self._tokens = dict(self.coordinator._by_token)
        self.open_round()

    def open_round(self) -> None:
        """What the round loop does before it waits: open the round, plan it, and have the coordinator
        serve it (the loop's send_and_receive would then wait for its uploads)."""
        c = self.coordinator
        if c.federation.current is not None:
            c.federation.abandon_round()
        c.federation.completed = self.first_round - 1
        info = c.federation.open_round([0])
        c.open(c.loop.plan(info), c.loop.accept(info))
        with c._cond:
            c._round_deadline = time.monotonic() + 3600

    def reset(self) -> None:
        """Undo what an input did: registrations, tokens, liveness, a counted upload."""
        c = self.coordinator
        with c._cond:
            c.clients = {i: dataclasses.replace(cl) for i, cl in self._clients.items()}
            c._by_token = dict(self._tokens)
            c._offline_hooks.clear()
            c._told_finished.clear()
            c._upload_sizes.clear()
            c.finished = False
        info = c.federation.current
        if info is None or c._results or info.number != self.first_round:
            self.open_round()

    def client(self, index: int) -> Client:
        return self.coordinator.clients[index % len(NAMES)]

    @property
    def upload_name(self) -> str:
        return upload_name(self.coordinator.federation.current.phase)

    def global_upload(self) -> bytes:
        """The open round's artifact that an upload replaces: an honest client's upload has its layout."""
        c = self.coordinator
        return c._artifacts["cnn2"][self.upload_name]


@functools.cache
def model_federation() -> Federation:
    return Federation(MODEL_CONFIG, 1)


@functools.cache
def generator_federation() -> Federation:
    return Federation(GENERATOR_CONFIG, 2)


def _federation(which: object) -> Federation:
    return generator_federation() if which == "generator" else model_federation()


# ---------------------------------------------------------------------------------------- stand-ins
@dataclasses.dataclass
class _Message:
    """What paho hands a subscriber: the topic and the payload."""

    topic: str
    payload: bytes


class _Published:
    """paho's MQTTMessageInfo, for a publish that went out."""

    rc = 0

    def wait_for_publish(self, _timeout: float | None = None) -> bool:
        return True


class _Link:
    """Stands in for gefl.protocol.mqtt.Connection: always connected, keeps what is published (the last few)
    and hands each publish to `on_publish`, where a test broker's peer would answer."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.generation = 1
        self.sent: list[tuple[str, bytes]] = []
        self.on_publish: Callable[[str, bytes], None] | None = None

    def wait_connected(self, _timeout: float) -> bool:
        return True

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> _Published:
        self.sent.append((topic, bytes(payload)))
        del self.sent[:-8]
        if self.on_publish is not None:
            self.on_publish(topic, bytes(payload))
        return _Published()

    def subscribe(self, *_topics: str) -> None:
        pass

    def unsubscribe(self, *_topics: str) -> None:
        pass

    def close(self, _last_words: object = None) -> None:
        pass

    def restart(self) -> None:
        """Reconnect (the client does, to set a last will MAC'd with a new token): a new generation."""
        self.generation += 1


class Aborted(Exception):  # noqa: N818 - grpc's own abort raises a bare Exception
    """What the stand-in gRPC context's abort raises: the handler refused the call with a status."""


class _Context:
    """Stands in for grpc.ServicerContext: bearer-token metadata, no client certificate, abort raises."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict:
        return {}

    def abort(self, code: object, details: str) -> None:
        raise Aborted(f"{code}: {details}")

    def is_active(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


def _snapshot(obj: object) -> dict[str, Any]:
    """An object's plain-data attributes (containers, strings, numbers), deep-copied: what an input can
    change in a transport or bridge, and what `_restore` puts back. Locks, connections and the like
    are left alone, and attributes the code adds later (it is being developed) are covered without
    naming them here."""
    plain = (dict, list, set, tuple, str, bytes, int, float, bool, type(None))
    return {k: copy.deepcopy(v) for k, v in vars(obj).items() if isinstance(v, plain)}


def _restore(obj: object, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        setattr(obj, key, copy.deepcopy(value))


def seal(key_secret: str, topic: str, body: bytes) -> bytes:
    """`body` sealed for `topic` as the aggregator seals tasks and replies (gefl.protocol.mqtt.seal, over the raw
    bytes: the fuzzer cannot compute a MAC, so the harness does, and the bytes reach the parser)."""
    return m.mac(m.key_of(key_secret), "sealed", topic, body).encode() + b"\n" + body


class _ClientSide:
    """The client transport of board-0 (MqttClientTransport) on a stand-in connection: registered in
    federation FEDERATION with TOKENS[0], while an artifact (DOWNLOAD_SHA, two chunks whose sha256s
    its task listed) is being downloaded."""

    def __init__(self) -> None:
        self.log = _Log()
        t = self.transport = MqttClientTransport(m.BrokerUrl("127.0.0.1", 1883, False, FEDERATION), ENROL_TOKEN,
                                                 m.MqttAuth())
        t.name, t.topics, t.token, t._will_token = NAMES[0], m.Topics(FEDERATION), TOKENS[0], TOKENS[0]
        t.session = "0" * 16
        self.link = _Link()
        t.connection = self.link  # type: ignore[assignment]
        t._drop_log = lambda _topic, line: self.log(line)  # every drop logged, none rate-limited away
        ref = ArtifactRef("model", DOWNLOAD_SIZE, DOWNLOAD_SHA)
        t._downloads = {DOWNLOAD_SHA: _Download(ref, list(CHUNK_HASHES))}
        self._saved = _snapshot(t)

    def reset(self) -> None:
        _restore(self.transport, self._saved)
        self.link.on_publish = None
        self.log.last = ""


@functools.cache
def client_side() -> _ClientSide:
    return _ClientSide()


class _Bridge:
    """The aggregator's MqttBridge over the model federation, on a stand-in broker connection."""

    def __init__(self) -> None:
        self.federation = model_federation()
        self.log = _Log()
        b = self.bridge = MqttBridge(self.federation.coordinator, m.BrokerUrl("127.0.0.1", 1883, False, FEDERATION),
                                     m.MqttAuth())
        b.connection = _Link()  # type: ignore[assignment]
        b._log_drop = lambda _topic, line: self.log(line)  # every drop logged, none rate-limited away
        b._names = {name: i for i, name in enumerate(NAMES)}
        self._saved = _snapshot(b)

    def reset(self) -> None:
        _restore(self.bridge, self._saved)
        self.log.last = ""
        self.federation.reset()


@functools.cache
def bridge() -> _Bridge:
    return _Bridge()


@functools.cache
def checkpoint_logic() -> Coordinator:
    """A coordinator of the generator federation whose logic restores the checkpoints under test (its
    own, so that what a checkpoint restores never reaches the federations the other targets use)."""
    _register_mini_dataset()
    return build_coordinator(config_from_dict({**GENERATOR_CONFIG, "name": "fuzz-checkpoint"}),
                             _tmp() / "checkpoint-logic", ENROL_TOKEN)


# ---------------------------------------------------------------------------------------- wire codec
@_target
def fuzz_wire(data: bytes) -> None:
    """gefl.protocol.wire.decode_arrays and decode_state: every tensor payload a peer sends (uploads, artifacts,
    checkpoints). What decodes must encode again to the same arrays, and reach torch."""
    arrays = decode_arrays(data)
    state = decode_state(data)
    assert state.keys() == arrays.keys()
    again = decode_arrays(encode_arrays(arrays))
    assert arrays_digest(again) == arrays_digest(arrays), "decoded arrays do not survive encoding again"


# ---------------------------------------------------------------------------------------- MQTT framing
_KINDS: tuple[type | tuple[type, ...], ...] = (int, str, float, (int, float), bool, list, dict)
_KEYS = ("round", "phase", "name", "size", "sha256", "num_samples", "loss", "index", "count", "token", "status")


def _probe_fields(message: dict, what: str) -> None:
    """gefl.protocol.mqtt.field on every key the message has and the protocol's own, as every kind a reader asks for."""
    for key in [*list(message)[:16], *_KEYS]:
        for kind in _KINDS:
            with contextlib.suppress(m.Malformed):
                m.field(message, key, kind, what)


@_target
def fuzz_mqtt_frame(data: bytes) -> None:
    """gefl.protocol.mqtt.decode_frame (every chunk either end receives), then field() on its header."""
    header, body = m.decode_frame(data, "frame")
    assert isinstance(header, dict) and len(body) <= m.MAX_FRAME_BYTES
    _probe_fields(header, "frame")


@_target
def fuzz_mqtt_json(data: bytes) -> None:
    """gefl.protocol.mqtt.decode_json (registrations, heartbeats, tasks, replies), then field() on the object."""
    message = m.decode_json(data, "message")
    assert isinstance(message, dict)
    _probe_fields(message, "message")


def _client_name_ok(name: str) -> bool:
    """The documented client name: 1-128 of letters, digits and ._:@-, the first a letter or digit
    (README, gefl.protocol.valid_client_name); checked here character by character, not by a regex."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-")
    return 0 < len(name) <= 128 and name[0].isascii() and name[0].isalnum() and set(name) <= allowed


@_target
def fuzz_mqtt_topic(data: bytes) -> str | None:
    """gefl.protocol.mqtt.Topics.client_of, which turns the topic of every message the aggregator reads into the
    client it claims to come from. A name it accepts must be a documented client name, and must
    give the same topic back. (Topics are UTF-8 on the wire: the broker refuses anything else.)"""
    try:
        topic = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8: refused by the broker"
    topics = m.Topics(FEDERATION)
    name, kind = topics.client_of(topic)
    # (A topic that ends at the name is read with kind "": no topic the aggregator reads, so harmless.)
    same = topics.client(name, kind) == topic or (kind == "" and topic == f"{topics.root}/client/{name}")
    assert same, f"{topic!r} is read as client {name!r}, kind {kind!r}"
    assert _client_name_ok(name), f"client_of({topic!r}) accepts the client name {name!r}"
    return None


# ---------------------------------------------------------------------------------------- client side
@_target
def fuzz_client_task(data: bytes) -> None:
    """edge_client.mqtt_transport._task_of over decode_json: a task message from the aggregator."""
    task_id, task = _task_of(m.decode_json(data, "task"))
    assert isinstance(task_id, str) and isinstance(task.deadline_s, float)


CLIENT_TOPICS = ("task", "reply", "chunk", "register", "raw")
RAW_TOPICS = ("task", "reply", "current", "chunk", "other")


def client_input(kind: str, payload: bytes, index: int = 0) -> bytes:
    """An input of fuzz_client_messages: one byte for the kind, for "chunk" the chunk's index and for
    "raw" the topic (RAW_TOPICS) in one more byte, then the payload."""
    head = bytes([CLIENT_TOPICS.index(kind)])
    return head + (bytes([index]) if kind in ("chunk", "raw") else b"") + payload


@_target
def fuzz_client_messages(data: bytes) -> str | None:
    """What the MQTT client transport does with what it receives (MqttClientTransport._on_message, then
    what the runtime calls next): a task on its task topic (then fetch_task), a reply on its reply
    topic, both sealed by the harness with board-0's token as the aggregator seals them; an artifact
    chunk on the chunk's topic; the reply to a registration, sealed with the enrolment token's key
    and parsed by register() into a Registration; or a payload as it is, unsealed ("raw"), on any
    topic, for the seal checks themselves. Byte 0 picks (CLIENT_TOPICS), see client_input."""
    side = client_side()
    side.reset()
    t, transport = m.Topics(FEDERATION), side.transport
    reader = _Reader(data)
    kind = CLIENT_TOPICS[reader.byte() % len(CLIENT_TOPICS)]
    try:
        if kind == "register":
            transport.token = ""  # not registered yet: the reply is sealed with the enrolment token's key
            reply_topic, reply = t.client(NAMES[0], "reply"), reader.rest()

            def answer(topic: str, _payload: bytes) -> None:
                if topic == t.client(NAMES[0], "register"):
                    transport._on_message(_Message(reply_topic, seal(ENROL_TOKEN, reply_topic, reply)))

            side.link.on_publish = answer
            # secrets: the request id the seeds' replies carry; REPLY_TIMEOUT_S: look at the replies once,
            # instead of waiting 30 s for one that will not come.
            with mock.patch.object(client_mqtt, "secrets", mock.Mock(token_hex=lambda _n: REQUEST_ID)), \
                    mock.patch.object(client_mqtt, "REPLY_TIMEOUT_S", 0.0):
                registration = transport.register(RegisterRequest(name=NAMES[0], tier="cnn2", num_samples=SAMPLES))
            assert isinstance(registration.heartbeat_interval_s, float)
            _no_surprise(side.log.last)
            return None
        if kind in ("task", "reply"):
            topic = t.client(NAMES[0], kind)
            payload = seal(TOKENS[0], topic, reader.rest())
        elif kind == "chunk":
            topic, payload = t.chunk(DOWNLOAD_SHA, reader.byte()), reader.rest()
        else:
            which = RAW_TOPICS[reader.byte() % len(RAW_TOPICS)]
            topic = {"current": t.current, "chunk": t.chunk(DOWNLOAD_SHA, 0),
                     "other": f"{t.root}/client/{NAMES[1]}/task"}.get(which) or t.client(NAMES[0], which)
            payload = reader.rest()
        transport._on_message(_Message(topic, payload))
        if topic == t.client(NAMES[0], "task"):
            transport.fetch_task(0.0)
        _no_surprise(side.log.last)
        return side.log.last or None
    finally:
        side.link.on_publish = None


def _no_surprise(line: str) -> None:
    """A receiver that drops what raised anything at all logs it as f"unexpected {exc!r}": that is the
    safety net catching a bug, which counts as a crash here."""
    assert not re.search(r"\bunexpected [A-Z]\w*\(", line), line


def _client_config_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@_target
def fuzz_client_config(data: bytes) -> str | None:
    """The run config a registration reply carries, read as the client runtime reads it
    (gefl.config.config_from_yaml, as edge_client/runtime.py's ClientRuntime._prepare does, then the
    dataset's classes). Strings arrive as valid UTF-8 on both transports
    (protobuf and JSON check it)."""
    text = _client_config_text(data)
    if text is None:
        return "not UTF-8: refused by protobuf / JSON"
    cfg = config_from_yaml(text, "the fuzzer")
    dataset_classes(cfg.dataset)
    return None


# ---------------------------------------------------------------------------------------- aggregator side
@_target
def fuzz_bridge_header(data: bytes) -> None:
    """aggregator.mqtt_bridge._header_of over decode_frame: an upload chunk's header, and the
    index/count fields the bridge reads beside it."""
    message, _body = m.decode_frame(data, "result chunk")
    header = _header_of(message, "result chunk")
    assert isinstance(header, UploadHeader) and isinstance(header.loss, float)
    m.field(message, "index", int, "result chunk")
    m.field(message, "count", int, "result chunk")


BRIDGE_TOPICS = ("register", "result", "status", "result-1", "topic")


def bridge_input(kind: str, payload: bytes, topic: str = "") -> bytes:
    """An input of fuzz_bridge_messages: one byte for the kind; for "register" and "topic" the name of
    the registering client or the topic's tail under gefl/fuzz/ and a NUL (which no MQTT topic may
    hold); then the payload."""
    head = bytes([BRIDGE_TOPICS.index(kind)])
    return head + (topic.encode() + b"\0" if kind in ("register", "topic") else b"") + payload


@_target
def fuzz_bridge_messages(data: bytes) -> str | None:
    """MqttBridge._on_message, everything the aggregator reads from the broker: a registration on a
    client's register topic, a result chunk or a heartbeat of board-0, a result chunk on board-1's
    topic (registered, not in the round), or a message on any topic under gefl/fuzz/. Byte 0 picks
    (BRIDGE_TOPICS), see bridge_input. What the bridge publishes back is kept by the stand-in link."""
    side = bridge()
    t = side.bridge.topics
    reader = _Reader(data)
    kind = BRIDGE_TOPICS[reader.byte() % len(BRIDGE_TOPICS)]
    rest = reader.rest()
    if kind in ("register", "topic"):
        tail, _, rest = rest.partition(b"\0")
        text = tail.decode("utf-8", "replace")
        topic = t.client(text, "register") if kind == "register" else f"{t.root}/{text}"
    else:
        topic = t.client(NAMES[1] if kind == "result-1" else NAMES[0], kind.split("-")[0])
    try:
        side.bridge._on_message(topic, rest)
        _no_surprise(side.log.last)
        _check_names(side.federation.coordinator)
        return f"dropped: {side.log.last}" if side.bridge.dropped else None
    finally:
        side.reset()


def _proto_int(head: dict, key: str, default: int, bits: int) -> int:
    value = head.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**bits else default


def _proto_str(head: dict, key: str, default: str) -> str:
    value = head.get(key, default)
    return value if isinstance(value, str) else default


def _proto_float(head: dict, key: str, default: float) -> float:
    value = head.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value) if isinstance(value, float) or abs(value) < 2**1000 else default


@_target
def fuzz_coordinator_upload(data: bytes) -> str | None:
    """Coordinator.check_header, then Coordinator.submit with the body: every check an upload passes
    before it counts, on either transport. The input is a frame (envelope_input): its JSON header
    names the federation ("federation": "model" or "generator"), the client (0: in the round, 1: not)
    and any UploadHeader field, typed as the protobuf message types them (uint32 round, uint64 size
    and num_samples, double loss; a value of another type or range is the default). Missing fields
    are an honest client's, size and sha256 those of the body, so mutated bodies get past the checksum
    to the tensor checks."""
    head, body = _envelope(data)
    fed = _federation(head.get("federation"))
    coordinator = fed.coordinator
    info = coordinator.federation.current
    client = fed.client(_proto_int(head, "client", 0, 32))
    header = UploadHeader(
        round=_proto_int(head, "round", info.number, 32), phase=_proto_str(head, "phase", info.phase),
        name=_proto_str(head, "name", fed.upload_name), size=_proto_int(head, "size", len(body), 64),
        sha256=_proto_str(head, "sha256", sha256(body)), num_samples=_proto_int(head, "num_samples", SAMPLES, 64),
        loss=_proto_float(head, "loss", 0.5))
    try:
        coordinator.check_header(client, header)
        coordinator.submit(client, header, body)
    finally:
        fed.reset()
    return None


GRPC_OPS = ("register", "download", "heartbeat", "upload")


def grpc_input(op: str, messages: list[bytes], wrong_token: bool = False) -> bytes:
    """An input of fuzz_grpc_service: the call (and whether its token is wrong), then each request
    message as a 4-byte length and its protobuf bytes."""
    return bytes([GRPC_OPS.index(op) | (4 if wrong_token else 0)]) + b"".join(
        struct.pack(">I", len(b)) + b for b in messages)


_GRPC_REQUEST = {"register": pb.RegisterRequest, "download": pb.DownloadRequest,
                 "heartbeat": pb.HeartbeatRequest, "upload": pb.UploadMessage}


@_target
def fuzz_grpc_service(data: bytes) -> str | None:
    """The gRPC servicer's handlers (aggregator.grpc_server.AggregatorService) on the request messages
    a client sends, after protobuf has parsed them: Register (the bearer token is the enrolment
    token), Download, a Heartbeat stream and an Upload stream (as board-0). An abort with a status
    is the handler refusing the call; bytes protobuf cannot parse never reach a handler."""
    reader = _Reader(data)
    first = reader.byte()
    op, wrong = GRPC_OPS[first % 4], bool(first & 4)
    messages = []
    while reader.left and len(messages) < 64:
        raw = reader.take(reader.u32())
        try:
            messages.append(_GRPC_REQUEST[op].FromString(raw))
        except DecodeError:
            break  # grpc ends the call there: the handler never sees the message
    if not messages and op in ("register", "download"):
        return "no request message"
    fed = model_federation()
    service = AggregatorService(fed.coordinator)
    token = "wrong-token" if wrong else (ENROL_TOKEN if op == "register" else TOKENS[0])
    context = _Context(token)
    try:
        if op == "register":
            service.Register(messages[0], context)
        elif op == "download":
            for _chunk in service.Download(messages[0], context):
                pass
        elif op == "heartbeat":
            for _reply in service.Heartbeat(iter(messages), context):
                pass
        else:
            service.Upload(iter(messages), context)
        _check_names(fed.coordinator)
    except Aborted as exc:
        return f"aborted: {exc}"
    finally:
        fed.reset()
    return None


def _check_names(coordinator: Coordinator) -> None:
    """Every registered name is a documented client name: it goes into topics, log lines and file names."""
    for client in list(coordinator.clients.values()):
        assert _client_name_ok(client.name), f"client {client.client_id} registered under the name {client.name!r}"


# ---------------------------------------------------------------------------------------- files
@_target
def fuzz_checkpoint(data: bytes) -> None:
    """The aggregator's checkpoint, read when it starts on a state directory that has one
    (RoundLoop.__init__ -> Coordinator.restore, TrainingLogic.restore); a damaged one must be refused."""
    base = checkpoint_logic()
    state_dir = _tmp() / "checkpoint"
    state_dir.mkdir(exist_ok=True)
    path = state_dir / checkpoint_module.CHECKPOINT
    path.write_bytes(data)
    resealed = _resealed_checkpoint(path)
    def resume() -> None:  # a fresh coordinator each time; the logic is the one federation's, restored in place
        RoundLoop(base.loop.logic, Coordinator(base.admission, base.settings, ENROL_TOKEN),
                  num_clients=base.settings.num_clients, checkpoint_path=path)

    try:
        resume()
    finally:
        if resealed is not None:  # and once more past the digest, as if the damage had been written so
            path.write_bytes(resealed)
            resume()


def _resealed_checkpoint(path: Path) -> bytes | None:
    """The checkpoint with its digest made to match what it holds (the fuzzer cannot compute one), so a
    mutated checkpoint also reaches the code behind the digest check: what a checkpoint written by a
    buggy or older aggregator, or edited and resealed, would take. None when the input has no
    metadata object to seal or the aggregator keeps no digest."""
    from safetensors import safe_open

    from gefl.rounds.checkpoint import digest

    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {})["gefl"])
        arrays = decode_arrays(path.read_bytes())
    except Exception:  # noqa: BLE001 - whatever the raw load does with it, there is nothing to reseal
        return None
    if not isinstance(meta, dict):
        return None
    meta.pop("sha256", None)
    try:
        meta["sha256"] = digest(arrays, meta)
    except (TypeError, ValueError):
        return None
    return encode_arrays(arrays, {"gefl": json.dumps(meta)})


@_target
def fuzz_generator_file(data: bytes) -> None:
    """gefl.rounds.rundir.load_generator on a generator.safetensors file (`gefl samples`, a run handed over)."""
    path = _tmp() / "generator.safetensors"
    path.write_bytes(data)
    generator, meta = load_generator(path)
    assert isinstance(meta, dict)


_FILE_KINDS = len(IMAGE_SUFFIXES) + 3
"""Entry kinds of an image folder input: a file with each image suffix, one in a nested folder,
a symbolic link to a folder, a file without an image suffix."""


def _file_name(raw: bytes, default: str) -> str:
    """A name for the filesystem from fuzzed bytes: any bytes but '/' and NUL (Linux takes the rest)."""
    raw = raw.replace(b"/", b"_").replace(b"\0", b"_")[:64]
    return default if raw in (b"", b".", b"..") else os.fsdecode(raw)


def image_folder_input(channels: int | None, folders: list[bytes], files: list[tuple[int, int, bytes, bytes]]) -> bytes:
    """An input of fuzz_image_folder. `files` are (folder index, kind, name stem, content); kind is an
    index into IMAGE_SUFFIXES, or len(IMAGE_SUFFIXES) for a .png in a sub-folder, + 1 for a symbolic
    link named stem + ".png" whose target is the content (a relative path, e.g. b"." or b"../00-a/x.png"),
    + 2 for a file with no image suffix."""
    out = bytearray([{None: 0, 1: 1, 3: 2}[channels], len(folders) - 1])
    for name in folders:
        out += bytes([len(name)]) + name
    for folder, kind, stem, content in files:
        out += bytes([folder, kind, len(stem)]) + stem + struct.pack(">H", len(content)) + content
    return bytes(out)


def _link_target(raw: bytes, folder: Path, root: Path) -> str:
    """A relative link target from fuzzed bytes that stays inside the harness's folder around `root`
    (whatever the code under test does with links, it must not be led around the real filesystem)."""
    target = os.fsdecode(raw.replace(b"\0", b"_")[:128].lstrip(b"/")) or "."
    inside = os.path.normpath(os.path.join(folder, target))
    return target if inside == str(root.parent) or inside.startswith(str(root.parent) + os.sep) else "."


def _build_image_folder(data: bytes, root: Path) -> int | None:
    """The directory an input describes (image_folder_input's layout), under `root`; returns `channels`."""
    reader = _Reader(data)
    channels = (None, 1, 3)[reader.byte() % 3]
    folders = []
    for i in range(1 + reader.byte() % 4):
        name = _file_name(reader.take(reader.byte() % 32), f"{i:02d}-class")
        (root / name).mkdir(exist_ok=True)
        folders.append(root / name)
    for i in range(8):
        if not reader.left:
            break
        folder = folders[reader.byte() % len(folders)]
        kind = reader.byte() % _FILE_KINDS
        stem = _file_name(reader.take(reader.byte() % 32), f"image-{i}")
        content = reader.take(reader.u16())
        with contextlib.suppress(OSError):  # a name the filesystem will not take: that entry is left out
            if kind < len(IMAGE_SUFFIXES):
                (folder / f"{stem}{IMAGE_SUFFIXES[kind]}").write_bytes(content)
            elif kind == len(IMAGE_SUFFIXES):
                (folder / "nested").mkdir(exist_ok=True)
                (folder / "nested" / f"{stem}.png").write_bytes(content)
            elif kind == len(IMAGE_SUFFIXES) + 1:
                os.symlink(_link_target(content, folder, root), folder / f"{stem}.png")
            else:
                (folder / stem).write_bytes(content)
    return channels


@_target
def fuzz_image_folder(data: bytes) -> None:
    """gefl.image_folder.read_image_folder on a directory built from the input (image_folder_input):
    up to four class folders with fuzzed names, up to eight entries: image files with any suffix,
    nested ones, symbolic links to anything inside the tree (loops included). Such a directory comes
    from elsewhere: a shard that was copied or unpacked onto the board."""
    root = _tmp() / "image-folder" / "root"
    shutil.rmtree(root.parent, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        channels = _build_image_folder(data, root)
        images, labels, classes = read_image_folder(root, channels)
        assert images.ndim == 4 and len(images) == len(labels) and int(labels.max()) < len(classes)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------- registry
TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": fuzz_wire,
    "mqtt_frame": fuzz_mqtt_frame,
    "mqtt_json": fuzz_mqtt_json,
    "mqtt_topic": fuzz_mqtt_topic,
    "client_task": fuzz_client_task,
    "client_messages": fuzz_client_messages,
    "client_config": fuzz_client_config,
    "bridge_header": fuzz_bridge_header,
    "bridge_messages": fuzz_bridge_messages,
    "coordinator_upload": fuzz_coordinator_upload,
    "grpc_service": fuzz_grpc_service,
    "checkpoint": fuzz_checkpoint,
    "generator_file": fuzz_generator_file,
    "image_folder": fuzz_image_folder,
}

_PREPARE: dict[str, Callable[[], object]] = {
    "client_messages": client_side, "bridge_messages": bridge, "coordinator_upload": generator_federation,
    "grpc_service": model_federation, "checkpoint": checkpoint_logic,
}


def prepare(name: str) -> None:
    """Build what a target needs before it is timed (a coordinator takes a second or two), so no
    input is charged for it."""
    if name in _PREPARE:
        _PREPARE[name]()
    if name == "coordinator_upload":
        model_federation()


def replay(name: str, data: bytes, hang_s: float = HANG_S) -> None:
    """Run one input through one target the way the fuzzer does: a crash or a hang raises."""
    with watchdog(hang_s):
        TARGETS[name](data)


# ---------------------------------------------------------------------------------------- hostile inputs
def _hostile_payloads() -> dict[str, bytes]:
    """Inputs that every decoder must survive, by name."""
    rng = random.Random(0)
    return {
        "empty": b"",
        "open-brackets": b"[" * 60000,
        "safetensors-2GiB-header": struct.pack("<Q", 2**31) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        "frame-2GiB-header": struct.pack(">I", 2**31) + b'{"round":1}',
        "random-1": rng.randbytes(1),
        "random-100": rng.randbytes(100),
        "random-5000": rng.randbytes(5000),
    }


def hostile_inputs(name: str) -> dict[str, bytes]:
    """The hostile payloads as `name` reads them: as they are, and inside the target's own layout
    (behind each topic or call selector, as an upload's header or body, as an image file), so each
    reaches the decoder behind the selector too."""
    payloads = _hostile_payloads()
    out = dict(payloads)
    for label, payload in payloads.items():
        if name == "client_messages":
            out.update({f"{kind}:{label}": client_input(kind, payload) for kind in CLIENT_TOPICS})
        elif name == "bridge_messages":
            out.update({f"{kind}:{label}": bridge_input(kind, payload, "board-2" if kind == "register" else
                                                               "client/board-0/result") for kind in BRIDGE_TOPICS})
        elif name == "grpc_service":
            out.update({f"{op}:{label}": grpc_input(op, [payload]) for op in GRPC_OPS})
        elif name == "coordinator_upload":
            out[f"body:{label}"] = envelope_input({}, payload)
            out[f"generator-body:{label}"] = envelope_input({"federation": "generator"}, payload)
        elif name == "image_folder":
            out[f"png:{label}"] = image_folder_input(None, [b"00-class"], [(0, 0, b"image", payload[:65535])])
        elif name == "generator_file":
            text = payload.decode("latin-1")
            out[f"preset:{label}"] = _generator_file({"preset": text})
            out[f"options:{label}"] = _generator_file({"options": text})
        elif name == "checkpoint":
            out[f"metadata:{label}"] = encode_arrays({}, {"gefl": payload.decode("latin-1")})
    out.update({f"regression:{label}": data for label, data in _regressions().get(name, {}).items()})
    return out


def _generator_file(metadata: dict[str, str]) -> bytes:
    """A generator file without tensors whose metadata is a tiny cvae-f's, changed by `metadata`."""
    base = {"family": "cvae-f", "preset": '"small"', "options": '{"widths": [4, 8], "latent": 4}',
            "in_channels": "1", "num_classes": "10"}
    return encode_arrays({}, {**base, **metadata})


def _regressions() -> dict[str, dict[str, bytes]]:
    """Small inputs that crashed a target once (found by benchmarks/fuzz.py or by hand from what it
    found), kept so that each stays fixed."""
    registration = {"request_id": "r", "enrolment_token": ENROL_TOKEN, "name": "board-9\n", "tier": "cnn2",
                    "num_samples": SAMPLES}
    return {
        "mqtt_topic": {"newline-name": b"gefl/fuzz/client/board-0\n/status"},
        "bridge_messages": {"newline-name": bridge_input("register", m.encode_json(registration), "board-9\n")},
        "grpc_service": {"newline-name": grpc_input("register", [pb.RegisterRequest(
            protocol_version=1, name="board-9\n", tier="cnn2", num_samples=SAMPLES).SerializeToString()])},
        "client_config": {"unclosed-list": b"name: [\n", "nul": b"\x00"},
        "checkpoint": {"metadata-list": encode_arrays({}, {"gefl": "[]"}),
                       # resealed by the target: a digest that matches, then fields that are missing
                       "no-fields": encode_arrays({}, {"gefl": json.dumps(
                           {"format": checkpoint_module.FORMAT})})},
        "generator_file": {"preset-object": _generator_file({"preset": '{"a": 1}'}),
                           "options-list": _generator_file({"options": "[1, 2]"}),
                           "negative-latent": _generator_file({"options": '{"widths": [4, 8], "latent": -4}'})},
    }

