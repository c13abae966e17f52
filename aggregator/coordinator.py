"""The aggregator's coordinator: the round loop's way to clients on a network (a gefl.rounds.loop.Grid).

It keeps who is registered and alive, serves the open round's tasks and artifacts, and takes the
uploads that belong to it. The round loop itself (gefl.rounds.loop.RoundLoop, the one `gefl simulate`
runs too) opens the rounds, decides what counts, aggregates and checkpoints; `build_coordinator`
in aggregator/serve.py ties the two together.

It knows no transport: the gRPC servicer (and the MQTT bridge) call its methods from their own
threads and translate its `Refused` errors into their status codes. A round waits until `quorum`
clients are online, and ends as soon as every participant has answered or dropped out, or at
`round_timeout`. A client is offline when its heartbeat stream closes or it has been silent for
`heartbeat_timeout`; any call brings it back for the next round.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gefl import protocol as p
from gefl.errors import GeflError
from gefl.protocol import ArtifactRef, Refused, RegisterRequest, Registration, TaskInfo, UploadHeader
from gefl.protocol.wire import sha256
from gefl.rounds.federation import ClientResult, Federation
from gefl.rounds.loop import Accept, Delivery, RoundLoop, RoundPlan

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


class Admission(Protocol):
    """What registration needs from the federation: its name, its config, and the device policy."""

    federation: str
    config_yaml: str

    def choose_tier(self, request: RegisterRequest) -> tuple[str, str]:
        """(tier, reason) for a registering client; raises GeflError if it cannot take part."""


@dataclass
class Client:
    client_id: int
    name: str
    tier: str
    token_sha256: str
    num_samples: int
    label_histogram: list[int]
    online: bool = False
    last_seen: float = 0.0
    tier_reason: str = ""
    transport: str = ""
    since: float = 0.0
    """Monotonic time it last went online or offline."""
    contributed: int = 0
    """Rounds whose aggregate holds its result."""
    refusals: list[dict] = field(default_factory=list)
    """Its last few refused uploads: round, code, reason."""

    def to_dict(self) -> dict:
        return {"client_id": self.client_id, "name": self.name, "tier": self.tier, "token_sha256": self.token_sha256,
                "num_samples": self.num_samples, "label_histogram": self.label_histogram,
                "tier_reason": self.tier_reason, "contributed": self.contributed}


@dataclass(frozen=True)
class Settings:
    num_clients: int
    min_clients: int
    round_timeout: float
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 20.0
    client_fraction: float = 1.0
    seed: int = 0
    eval_every: int = 10
    finish_grace: float = 5.0
    """After the last round, how long to wait for online clients to hear that the run is over."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Coordinator:
    retries = True
    """A round short of its quorum runs again: clients on a network come back."""

    def __init__(self, admission: Admission, settings: Settings, enrol_token: str) -> None:
        self.admission = admission
        self.settings = settings
        self._enrol_sha256 = _hash(enrol_token)
        self.loop: RoundLoop | None = None
        """The round loop driving this coordinator (set by build_coordinator)."""
        self.clients: dict[int, Client] = {}
        self._by_token: dict[str, int] = {}
        self._cond = threading.Condition()
        self._round_deadline = 0.0
        self._plan: RoundPlan | None = None
        self._accept: Accept | None = None
        self._results: dict[int, Any] = {}
        self._artifacts: dict[str, dict[str, bytes]] = {}
        self._refs: dict[str, tuple[ArtifactRef, ...]] = {}
        self._told_finished: set[int] = set()
        self._offline_hooks: dict[int, list[Callable[[], Any]]] = {}
        self._upload_sizes: dict[int, int] = {}
        self._refused: dict[int, str] = {}
        self._registry_dirty = False
        self.on_registry_change: Callable[[], None] = lambda: None
        """Called from the driver thread when registrations changed: the loop checkpoints them."""
        self.finished = False
        self.stopping = threading.Event()
        self.round_started: dict[int, float] = {}
        """Monotonic time each round number was (last) opened; the tests and benchmark read it."""
        self.round_closed: dict[int, float] = {}
        self._listeners: list[Callable[[str], Any]] = []

    @property
    def federation(self) -> Federation[Any]:
        """The round loop's federation state machine (rounds completed, the open round)."""
        if self.loop is None:
            raise RuntimeError("the coordinator has no round loop: build it with build_coordinator")
        return self.loop.federation

    def run(self) -> None:
        """Drive every remaining round (the round loop's run); returns when finished or `stopping` is set."""
        if self.loop is None:
            raise RuntimeError("the coordinator has no round loop: build it with build_coordinator")
        self.loop.run()

    # ------------------------------------------------------------------ called by transports
    def register(self, enrol_token: str, request: RegisterRequest, peer_name: str | None = None,
                 transport: str = "") -> Registration:
        """Admit a device, or give a registered one its client id back.

        The enrolment token is shared by every device, so it cannot tell them apart: a name that is
        already registered goes back only to the device that proves it owns it, by presenting the
        token it got then (`request.credential`, kept in its state directory) or a client
        certificate issued to that name (`peer_name`, the verified mutual-TLS identity). Anyone else
        would take the device's client id and invalidate its token.
        """
        if not hmac.compare_digest(_hash(enrol_token), self._enrol_sha256):
            raise Refused(p.UNAUTHENTICATED, "registration refused: wrong or missing enrolment token "
                          "(give the aggregator's token in GEFL_TOKEN or a --token-file)")
        if request.protocol_version != p.PROTOCOL_VERSION:
            raise Refused(p.FAILED_PRECONDITION, f"protocol version {request.protocol_version} is not supported; "
                          f"this aggregator speaks version {p.PROTOCOL_VERSION}: upgrade gefl-edge on the device")
        name = request.name
        if not p.valid_client_name(name):
            raise Refused(p.INVALID_ARGUMENT, f"client name {name[:p.MAX_NAME]!r} is not valid: use 1-{p.MAX_NAME} "
                          "letters, digits and ._:@- (for example the hostname)")
        if not 0 < request.num_samples <= 10**9:
            raise Refused(p.INVALID_ARGUMENT, f"num_samples must be positive, got {request.num_samples}: "
                          "a client without training data cannot take part")
        histogram = request.label_histogram
        if histogram and (len(histogram) > 100_000 or sum(histogram) != request.num_samples):
            raise Refused(p.INVALID_ARGUMENT, f"the label histogram ({len(histogram)} classes, {sum(histogram)} "
                          f"samples) does not add up to num_samples {request.num_samples}")
        if peer_name is not None and peer_name != name:
            raise Refused(p.UNAUTHENTICATED, f"client name {name!r} is not the name on this device's client "
                          f"certificate ({peer_name!r}): a device registers under the name its certificate was "
                          "issued to")
        try:
            tier, reason = self.admission.choose_tier(request)
        except Refused:
            raise
        except GeflError as exc:  # the device cannot take part as asked; anything else is our bug, not theirs
            raise Refused(p.INVALID_ARGUMENT, f"client {name}: {exc}") from exc
        token = secrets.token_urlsafe(32)
        with self._cond:
            client_id = next((c.client_id for c in self.clients.values() if c.name == name), None)
            if client_id is not None:
                old = self.clients[client_id]
                if request.credential and hmac.compare_digest(_hash(request.credential), old.token_sha256):
                    token = request.credential  # proven; and a device that lost the reply still holds its token
                elif peer_name != name:
                    raise Refused(p.UNAUTHENTICATED, f"client name {name!r} is registered by another device: "
                                  "registering again under it needs that device's own credential (kept in its "
                                  f"--state-dir) or a client certificate issued to {name!r}; a new device needs a "
                                  "name of its own (--name)")
            if client_id is None:
                if len(self.clients) >= self.settings.num_clients:
                    raise Refused(p.RESOURCE_EXHAUSTED, f"the federation is full: {self.settings.num_clients} "
                                  "clients are registered (num_clients); a device that registered before gets "
                                  "its place back by registering with the same name")
                client_id = len(self.clients)
                log.info(f"client {client_id} registered: {name}, {request.num_samples} samples, tier {tier} "
                         f"({reason})")
            else:
                old = self.clients[client_id]
                self._by_token.pop(old.token_sha256, None)
                log.info(f"client {client_id} registered again: {name}, tier {tier}")
            now = time.monotonic()
            earlier = self.clients.get(client_id)
            client = Client(client_id, name, tier, _hash(token), request.num_samples,
                            [int(n) for n in request.label_histogram], True, now, reason, transport, now,
                            earlier.contributed if earlier else 0, earlier.refusals if earlier else [])
            self.clients[client_id] = client
            self._by_token[client.token_sha256] = client_id
            self._registry_dirty = True
            self._cond.notify_all()
        return Registration(client_id, token, tier, reason, self.admission.config_yaml, self.admission.federation,
                            self.settings.heartbeat_interval)

    def authenticate(self, token: str) -> Client:
        """The client a token belongs to; marks it alive (any call is a sign of life)."""
        client_id = self._by_token.get(_hash(token or ""))
        if client_id is None:
            raise Refused(p.UNAUTHENTICATED, "unknown client token: register first (the aggregator may have "
                          "lost its state directory, in which case registering again is the fix)")
        with self._cond:
            client = self.clients[client_id]
            self._seen(client)
        return client

    def touch(self, client: Client) -> None:
        """A sign of life other than a heartbeat: a chunk moving in either direction. A client busy
        moving 22 MB over a saturated link must not be counted offline because its heartbeats queue
        behind its own data on the same connection."""
        with self._cond:
            self._seen(client)

    def _seen(self, client: Client) -> None:
        client.last_seen = time.monotonic()
        if not client.online:
            client.online, client.since = True, client.last_seen
            log.info(f"client {client.client_id} ({client.name}) is back")
            self._cond.notify_all()

    def on_offline(self, client: Client, hook: Callable[[], Any]) -> Callable[[], None]:
        """Call `hook` when `client` is counted offline; returns the function that removes it."""
        with self._cond:
            self._offline_hooks.setdefault(client.client_id, []).append(hook)

        def remove() -> None:
            with self._cond:
                hooks = self._offline_hooks.get(client.client_id, [])
                if hook in hooks:
                    hooks.remove(hook)

        return remove

    def disconnected(self, client: Client, why: str) -> None:
        with self._cond:
            if client.online and not self.finished:
                client.online, client.since = False, time.monotonic()
                log.warning(f"client {client.client_id} ({client.name}) is offline: {why}; not waiting for it")
                self._cond.notify_all()

    def heartbeat(self, client: Client) -> tuple[int, bool]:
        with self._cond:
            self._seen(client)
            if self.finished:
                self._told_finished.add(client.client_id)
            return (self._plan.info.number if self._plan else 0), self.finished

    def next_task(self, client: Client, wait_s: float, alive: Callable[[], bool] = lambda: True) -> TaskInfo:
        """The client's task in the open round, waiting up to `wait_s` for one (a long poll)."""
        until = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._cond:
            while True:
                task = self.task_for(client)
                if task.status != p.WAIT:
                    return task
                now = time.monotonic()
                if now >= until or self.stopping.is_set():
                    return TaskInfo(p.WAIT)
                if not alive():
                    return TaskInfo(p.WAIT)
                self._seen(client)
                self._cond.wait(min(until - now, 0.25))

    def task_for(self, client: Client) -> TaskInfo:
        """The client's task as things stand (no waiting): for transports that push tasks (MQTT)."""
        with self._cond:
            if self.finished:
                self._told_finished.add(client.client_id)
                self._cond.notify_all()
                return TaskInfo(p.FINISHED)
            plan = self._plan
            if (plan is not None and client.client_id in plan.info.participants
                    and client.client_id not in self._results and client.tier in self._refs):
                return self._task(plan, client)
            return TaskInfo(p.WAIT)

    def open_artifacts(self) -> tuple[int, dict[str, dict[str, bytes]], dict[str, tuple[ArtifactRef, ...]]]:
        """The open round's number (0: none) and its artifacts and their refs per tier."""
        with self._cond:
            return (self._plan.info.number if self._plan else 0), self._artifacts, self._refs

    def add_listener(self, listener: Callable[[str], Any]) -> None:
        """`listener(event)` is called from the driver thread, outside every lock, on 'round_opened',
        'round_closed' and 'finished': transports that push (MQTT) publish tasks and artifacts then."""
        self._listeners.append(listener)

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # a transport's failure must not stop the rounds
                log.exception(f"listener failed on {event}: {exc!r}")

    def _task(self, plan: RoundPlan, client: Client) -> TaskInfo:
        info = plan.info
        return TaskInfo(
            p.TRAIN, info.number, info.phase, client.tier, plan.seeds[client.client_id], self._refs[client.tier],
            plan.upload_name, plan.upload_limits[client.tier], max(0.0, self._round_deadline - time.monotonic()))

    def artifact(self, client: Client, round_number: int, name: str) -> bytes:
        with self._cond:
            info = self._plan.info if self._plan else None
            if info is None or info.number != round_number:
                raise Refused(p.FAILED_PRECONDITION, f"round {round_number} is not open "
                              f"(the open round is {info.number if info else 'none'})")
            if client.client_id not in info.participants:
                raise Refused(p.FAILED_PRECONDITION, f"client {client.client_id} is not a participant of round "
                              f"{round_number}")
            data = self._artifacts.get(client.tier, {}).get(name)
            if data is None:
                raise Refused(p.NOT_FOUND, f"round {round_number} has no artifact {name!r} for tier {client.tier}")
            return data

    def check_header(self, client: Client, header: UploadHeader) -> int:
        """Everything about an upload that can be refused before its bytes are read; returns its size limit."""
        try:
            plan, _ = self._check_header(client, header)
            return plan.upload_limits[client.tier]
        except Refused as exc:
            self.log_refusal(client, header.round, exc)
            raise

    def _check_header(self, client: Client, header: UploadHeader) -> tuple[RoundPlan, Accept]:
        with self._cond:
            plan, accept = self._plan, self._accept
            info = plan.info if plan else None
            if plan is None or accept is None or info is None or header.round != info.number:
                raise Refused(p.FAILED_PRECONDITION, f"round {header.round} is not open (the open round is "
                              f"{info.number if info else 'none'}): the result came too late")
            if client.client_id not in info.participants:
                raise Refused(p.FAILED_PRECONDITION, f"client {client.client_id} is not a participant of round "
                              f"{info.number}")
            if client.client_id in self._results:
                raise Refused(p.FAILED_PRECONDITION, f"client {client.client_id} already uploaded for round "
                              f"{info.number}")
            if header.phase != info.phase:
                raise Refused(p.INVALID_ARGUMENT, f"phase {header.phase!r} does not match round {info.number}'s "
                              f"phase {info.phase!r}")
            expected = plan.upload_name
            if header.name != expected:
                raise Refused(p.INVALID_ARGUMENT, f"artifact {header.name!r} is not expected: round "
                              f"{info.number} ({info.phase}) takes {expected!r}")
            limit = plan.upload_limits[client.tier]
        if header.size > limit:
            raise Refused(p.RESOURCE_EXHAUSTED, f"upload of {header.size:,} bytes exceeds the limit of "
                          f"{limit:,} bytes for a {client.tier} {expected}")
        if not _SHA256.match(header.sha256):
            raise Refused(p.INVALID_ARGUMENT, "the upload's sha256 must be 64 lowercase hex digits")
        if not 0 < header.num_samples <= client.num_samples:
            raise Refused(p.INVALID_ARGUMENT, f"num_samples {header.num_samples} is outside 1..{client.num_samples} "
                          "(the samples this client registered with)")
        if not math.isfinite(header.loss):
            raise Refused(p.INVALID_ARGUMENT, f"the reported training loss is {header.loss}: training diverged")
        return plan, accept

    def submit(self, client: Client, header: UploadHeader, payload: bytes) -> None:
        """Validate an upload completely and count it; a refusal leaves every global state untouched."""
        try:
            plan, accept = self._check_header(client, header)  # again: the round may have closed meanwhile
            if len(payload) != header.size:
                raise Refused(p.DATA_LOSS, f"received {len(payload):,} bytes, the header announced {header.size:,}")
            if sha256(payload) != header.sha256:
                raise Refused(p.DATA_LOSS, "the upload's sha256 does not match its header: corrupted in transit")
            try:
                result = accept(ClientResult(client.client_id, client.tier, plan.info.phase, payload,
                                             header.num_samples, header.loss))
            except Refused:
                raise
            except GeflError as exc:  # the upload is bad; any other exception is a bug here, not the client's
                raise Refused(p.INVALID_ARGUMENT, str(exc)) from exc
            with self._cond:
                if self._plan is not plan:
                    raise Refused(p.FAILED_PRECONDITION, f"round {header.round} closed while its upload was checked: "
                                  "the result came too late")
                if client.client_id in self._results:
                    raise Refused(p.FAILED_PRECONDITION, f"client {client.client_id} already uploaded for round "
                                  f"{header.round}")
                self._results[client.client_id] = result
                self._upload_sizes[client.client_id] = header.size
                self._seen(client)
                self._cond.notify_all()
        except Refused as exc:
            self.log_refusal(client, header.round, exc)
            raise

    def log_refusal(self, client: Client, round_number: int, exc: Refused) -> None:
        exc.logged = True
        with self._cond:
            client.refusals = [*client.refusals[-4:], {"round": round_number, "code": exc.code, "reason": str(exc)}]
            if self._plan is not None and self._plan.info.number == round_number:
                self._refused[client.client_id] = f"[{exc.code}] {exc}"
        log.warning(f"round {round_number}: upload from client {client.client_id} ({client.name}) refused "
                 f"[{exc.code}]: {exc}; the global state is unchanged by it")

    # ------------------------------------------------------------------ the grid, for the round loop
    @property
    def quorum(self) -> int:
        return self.settings.min_clients

    def tier_of(self, client_id: int) -> str:
        with self._cond:
            return self.clients[client_id].tier

    def _expire_silent(self) -> None:
        now = time.monotonic()
        for client in self.clients.values():
            if client.online and now - client.last_seen > self.settings.heartbeat_timeout:
                client.online, client.since = False, now
                log.warning(f"client {client.client_id} ({client.name}) is offline: no heartbeat for "
                         f"{now - client.last_seen:.1f} s; not waiting for it")
                for hook in self._offline_hooks.get(client.client_id, []):
                    hook()

    def wait_for_clients(self, quorum: int) -> list[int] | None:
        """The online clients once `quorum` are; None when stopping. Registrations are checkpointed
        meanwhile (and before the round): a device's credential must survive a crash."""
        waiting_said = False
        while not self.stopping.is_set():
            with self._cond:
                self._expire_silent()
                online = sorted(c.client_id for c in self.clients.values() if c.online)
                dirty = self._registry_dirty
            if dirty:
                self.on_registry_change()
            if len(online) >= quorum:
                return online
            if not waiting_said:
                log.info(f"waiting for clients: {len(online)} of {quorum} online")
                waiting_said = True
            with self._cond:
                self._cond.wait(0.2)
        return None

    def open(self, plan: RoundPlan, accept: Accept) -> None:
        """Start serving `plan`'s tasks and taking its uploads (the first half of send_and_receive)."""
        started = time.monotonic()
        refs = {tier: tuple(ArtifactRef(n, len(b), sha256(b)) for n, b in arts.items())
                for tier, arts in plan.artifacts.items()}  # hashed before taking the lock every call needs
        with self._cond:
            self._plan, self._accept, self._results, self._upload_sizes = plan, accept, {}, {}
            self._artifacts, self._refs, self._refused = plan.artifacts, refs, {}
            self._round_deadline = started + self.settings.round_timeout
            self.round_started[plan.info.number] = started
            self._cond.notify_all()

    def send_and_receive(self, plan: RoundPlan, accept: Accept) -> Delivery:
        """Serve the round's tasks and take its uploads until every participant has answered or
        dropped out, or the round times out."""
        self.open(plan, accept)
        self._notify("round_opened")
        with self._cond:
            while not self.stopping.is_set():
                self._expire_silent()
                pending = [c for c in plan.info.participants if c not in self._results and self.clients[c].online]
                if not pending or time.monotonic() >= self._round_deadline:
                    break
                self._cond.wait(0.1)
            delivery = Delivery(dict(self._results), dict(self._upload_sizes), dict(self._refused),
                                stopped=self.stopping.is_set())
            self._plan, self._accept, self._results, self._upload_sizes = None, None, {}, {}
            self._artifacts, self._refs = {}, {}
            self.round_closed[plan.info.number] = time.monotonic()
        self._notify("round_closed")
        return delivery

    def closed(self, record: dict) -> None:
        """A round was counted: its contributors' tallies go up (the status page shows them)."""
        with self._cond:
            for c in record.get("contributors", []):
                self.clients[c].contributed += 1

    def status(self) -> dict:
        """What the status page and `gefl aggregator status` show (no tokens, no token hashes)."""
        now = time.monotonic()
        with self._cond:
            plan = self._plan
            federation = self.loop.federation if self.loop is not None else None
            return {
                "federation": self.admission.federation,
                "completed": federation.completed if federation else 0,
                "total_rounds": federation.total_rounds if federation else 0,
                "finished": self.finished, "quorum": self.quorum,
                "round": {"number": plan.info.number, "phase": plan.info.phase,
                          "participants": list(plan.info.participants), "results": len(self._results),
                          "time_left_s": max(0.0, self._round_deadline - now)} if plan else None,
                "clients": [{"client_id": c.client_id, "name": c.name, "tier": c.tier, "tier_reason": c.tier_reason,
                             "transport": c.transport, "online": c.online,
                             "since_s": now - c.since if c.since else None,
                             "last_seen_s": now - c.last_seen if c.last_seen else None,
                             "num_samples": c.num_samples, "contributed": c.contributed,
                             "refusals": list(c.refusals)}
                            for c in sorted(self.clients.values(), key=lambda c: c.client_id)],
            }

    def roster(self) -> list[dict]:
        """Every registered client (no tokens), for partition.json."""
        with self._cond:
            return [{"client": c.client_id, "name": c.name, "tier": c.tier, "num_samples": c.num_samples,
                     "label_histogram": c.label_histogram} for c in sorted(self.clients.values(),
                                                                           key=lambda c: c.client_id)]

    def finish(self) -> None:
        """Tell the clients the run is over; waits up to finish_grace for the online ones to hear it."""
        with self._cond:
            self.finished = True
            self._cond.notify_all()
        self._notify("finished")
        with self._cond:
            until = time.monotonic() + self.settings.finish_grace
            while time.monotonic() < until:
                online = {c.client_id for c in self.clients.values() if c.online}
                if online <= self._told_finished:
                    break
                self._cond.wait(0.1)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The registrations (token hashes, never tokens), for the round loop's checkpoint."""
        with self._cond:
            self._registry_dirty = False
            return {"clients": [c.to_dict() for c in self.clients.values()]}

    def restore(self, state: dict) -> None:
        clients = [Client(int(c["client_id"]), str(c["name"]), str(c["tier"]), str(c["token_sha256"]),
                          int(c["num_samples"]), [int(n) for n in c["label_histogram"]],
                          tier_reason=str(c.get("tier_reason", "")), contributed=int(c.get("contributed", 0)))
                   for c in state["clients"]]
        for client in clients:
            if not p.valid_client_name(client.name) or not _SHA256.match(client.token_sha256):
                raise ValueError(f"client {client.client_id}'s name or token hash is not one this aggregator writes")
        with self._cond:
            for client in clients:
                self.clients[client.client_id] = client
                self._by_token[client.token_sha256] = client.client_id
