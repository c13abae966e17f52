"""The one driver of a federation's rounds, whatever reaches its clients.

`gefl simulate`, `gefl simulate --transport grpc|mqtt` and `gefl aggregator serve` all run
`RoundLoop.run`: open a round among the clients that are there, make each tier's artifacts and
each participant's seed, hand them to the `Grid` (worker processes on this machine, or the
coordinator that serves gRPC and MQTT clients), put the results it brings back through the
simulated device clock, close the round (or run it again, or skip it), aggregate and evaluate
through the `RoundLogic`, write the metrics record and checkpoint. A feature that touches a round
is built here once, so an in-process run and a networked run of one config compute the same
rounds by construction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gefl.errors import GeflError
from gefl.protocol.wire import arrays_digest
from gefl.rounds import checkpoint
from gefl.rounds.federation import GENERATOR, ClientResult, Federation, Phase, RoundInfo, round_traffic, task_seed

if TYPE_CHECKING:  # the schema imports the tiers (torch); the coordinator runs this loop without torch
    from gefl.schema import Config

log = logging.getLogger(__name__)

UPLOAD_SLACK = 64 * 1024
"""Bytes an upload may exceed the global artifact it updates by (safetensors header differences)."""


def upload_name(phase: str) -> str:
    """The artifact a client sends back in a round of `phase`."""
    return "generator" if phase == GENERATOR else "model"


class RoundLogic(Protocol):
    """What a round sends, how a result is checked and how results are combined (training in
    gefl.rounds.training_logic; echo rounds in the transport benchmark, so it measures this very loop)."""

    def phases(self) -> list[Phase]: ...

    def begin_round(self, info: RoundInfo) -> None: ...

    def artifacts(self, info: RoundInfo, tier: str) -> dict[str, bytes]: ...

    def check(self, info: RoundInfo, result: ClientResult) -> Any:
        """Validate a client's result; returns what to aggregate, raises GeflError to refuse it."""

    def end_round(self, info: RoundInfo, results: dict[int, Any], record: dict) -> str:
        """Aggregate (and evaluate when `info` says so) into `record`; returns the progress text."""

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]: ...

    def restore(self, arrays: dict[str, np.ndarray], meta: dict, completed: int) -> None: ...

    def record(self, record: dict) -> None:
        """Store a closed round's metrics record."""

    def finish(self, clients: list[dict], wall_s: float) -> None:
        """Write the run's results; `clients` describes every client (no tokens); `wall_s`: the run's
        wall time across restarts."""


class Clock(Protocol):
    """A simulated device clock (gefl.simulation.device_sim.DeviceSimulation): when each result
    would have arrived from its device, and which missed the round's deadline."""

    def client_seconds(self, client_id: int, samples: int, bytes_moved: int, generator_phase: bool) -> float: ...

    def close_round(self, seconds: dict[int, float]) -> tuple[list[int], float]:
        """(the late clients, the round's simulated duration)."""

    def clock_state(self) -> dict: ...

    def restore_clock(self, state: dict) -> None: ...


@dataclass(frozen=True)
class RoundPlan:
    """Everything a grid needs to run one round: who, which tier, which seed, which bytes."""

    info: RoundInfo
    tiers: dict[int, str]
    """Each participant's tier."""
    seeds: dict[int, int]
    artifacts: dict[str, dict[str, bytes]]
    """Per tier, the named artifacts its participants download."""
    upload_name: str
    upload_limits: dict[str, int]
    """Per tier, the largest upload accepted, in bytes (checked before reading it)."""


@dataclass
class Delivery:
    """What a grid brought back from one round: the results `accept` took, and their sizes."""

    results: dict[int, Any] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    """Participants whose result was refused, and why."""
    stopped: bool = False
    """The service is stopping: the round is dropped, not counted."""


Accept = Callable[[ClientResult], Any]


class Grid(Protocol):
    """The way to the clients. `retries`: a round short of its quorum runs again (clients on a
    network come and go) instead of being an error (in-process clients never drop out)."""

    retries: bool

    def wait_for_clients(self, quorum: int) -> Sequence[int] | None:
        """The clients there to take part once `quorum` are; None when the service is stopping."""

    def tier_of(self, client_id: int) -> str: ...

    def send_and_receive(self, plan: RoundPlan, accept: Accept) -> Delivery:
        """Run the round's tasks; every result goes through `accept` (a GeflError refuses it)."""

    def state(self) -> dict:
        """What the grid must keep across a restart (the coordinator's registrations), JSON."""

    def restore(self, state: dict) -> None: ...

    def closed(self, record: dict) -> None:
        """A round's metrics record, once it is stored (the coordinator counts contributions)."""

    def roster(self) -> list[dict]:
        """Every client, for partition.json."""

    def finish(self) -> None:
        """The last round is done (tell the clients)."""


def observers_for(cfg: Config) -> list[Callable[[dict], None]]:
    """The metrics observers a config asks for (`tensorboard: DIR`)."""
    if not cfg.tensorboard:
        return []
    from gefl.rounds.tensorboard import TensorBoard

    return [TensorBoard(cfg.tensorboard)]


class RoundLoop:
    """Drives `grid`'s clients through `logic`'s rounds; checkpoints to `checkpoint_path` after
    every round (and whenever the grid's registrations change) and resumes from it."""

    def __init__(self, logic: RoundLogic, grid: Grid, *, num_clients: int, quorum: int = 1,
                 client_fraction: float = 1.0, seed: int = 0, eval_every: int = 10,
                 checkpoint_path: Path | None = None, devices: Clock | None = None,
                 train_epochs: int = 1, generator_epochs: int = 1,
                 observers: Sequence[Callable[[dict], None]] = ()) -> None:
        self.logic = logic
        self.grid = grid
        self.quorum = quorum
        self.seed = seed
        self.checkpoint_path = checkpoint_path
        self.devices = devices
        self.observers = list(observers)
        """Called with every stored metrics record (TensorBoard); a failing one is logged, never fatal."""
        self._epochs = {False: train_epochs, True: generator_epochs}
        self.federation: Federation[Any] = Federation(logic.phases(), num_clients, client_fraction, seed, eval_every)
        self.started = time.monotonic()
        self.elapsed_before = 0.0
        self._resumed_at = 0
        if checkpoint_path is not None and checkpoint_path.exists():
            self._load(checkpoint_path)

    # ------------------------------------------------------------------ the rounds
    def run(self) -> None:
        """Drive every remaining round; returns when the run is finished or the grid is stopping."""
        if self.federation.completed:
            log.info(f"resuming after round {self.federation.completed} of {self.federation.total_rounds}; global "
                     f"state sha256 {arrays_digest(self.logic.snapshot()[0])}")
        while not self.federation.finished:
            online = self.grid.wait_for_clients(self.quorum)
            if online is None:
                return
            self._round(self.federation.open_round(online))
        self.logic.finish(self.grid.roster(), self.elapsed_s())
        self.grid.finish()

    def _round(self, info: RoundInfo) -> None:
        started = time.monotonic()
        plan = self.plan(info)
        delivery = self.grid.send_and_receive(plan, self.accept(info))
        if delivery.stopped:
            self.federation.abandon_round()
            return
        needed = min(self.quorum, len(info.participants))
        if len(delivery.results) < needed:
            self.federation.abandon_round()
            if not self.grid.retries:
                lost = len(info.participants) - len(delivery.results) - len(delivery.refused)
                why = []
                if delivery.refused:
                    why.append(f"{len(delivery.refused)} refused (see above; if training diverged, lower train.lr)")
                if lost > 0:
                    why.append(f"{lost} lost with their worker (see the warnings above)")
                raise GeflError(f"round {info.number}: {len(delivery.results)} accepted update(s) of "
                                f"{len(info.participants)}, the quorum is {needed}: " + "; ".join(why))
            log.warning(f"round {info.number}: {len(delivery.results)} result(s) by the deadline, the quorum is "
                     f"{needed}: running the round again")
            return
        record: dict = {"round": info.number, "phase": info.phase, "phase_round": info.phase_round,
                        "participants": list(info.participants)}
        if delivery.refused:
            record["refused"] = {str(c): reason for c, reason in sorted(delivery.refused.items())}
        late: list[int] = []
        if self.devices is not None:  # the simulated clock drops results a real deadline would have missed
            late, record["simulated_s"] = self._clock(plan, delivery)
            record["stragglers"] = late
        on_time = {c: r for c, r in sorted(delivery.results.items()) if c not in late}
        line = f"[{info.phase:>9} {info.phase_round:>3}/{info.phase_rounds:<3}] round {info.number:>3}/" \
               f"{self.federation.total_rounds}"
        if not on_time:
            self.federation.skip_round()
            line += "  every participant missed the deadline: no update this round"
        else:
            for c, result in on_time.items():
                self.federation.submit(c, info.number, result)
            results = self.federation.close_round()
            record["contributors"] = sorted(results)
            record["dropped"] = [c for c in info.participants if c not in delivery.results]
            record["bytes"] = round_traffic(
                [{n: len(b) for n, b in plan.artifacts[plan.tiers[c]].items()} for c in info.participants],
                [{plan.upload_name: delivery.upload_bytes[c]} for c in results])
            dropped = f", {len(record['dropped'])} dropped" if record["dropped"] else ""
            line += f"  {len(results)}/{len(info.participants)} results{dropped}"
            line += self.logic.end_round(info, results, record)
        if self.devices is not None:
            line += f"  simulated {record['simulated_s']:.1f}s" + (f", {len(late)} late" if late else "")
        record["seconds"] = time.monotonic() - started
        self.logic.record(record)
        self.grid.closed(record)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # a dashboard's trouble must not stop the federation
                log.exception(f"round {info.number}: an observer of the metrics failed")
        self.save_checkpoint()
        elapsed = time.monotonic() - self.started
        eta = elapsed / (info.number - self._resumed_at) * (self.federation.total_rounds - info.number)
        log.info(f"{line}  {record['seconds']:.1f}s  elapsed {elapsed:.0f}s  eta {eta:.0f}s")

    def plan(self, info: RoundInfo) -> RoundPlan:
        """Begin the round: each tier's artifacts, each participant's tier and seed."""
        self.logic.begin_round(info)
        tiers = {c: self.grid.tier_of(c) for c in info.participants}
        artifacts = {t: self.logic.artifacts(info, t) for t in dict.fromkeys(tiers.values())}
        name = upload_name(info.phase)
        return RoundPlan(info, tiers, {c: task_seed(self.seed, info.number, c) for c in info.participants},
                         artifacts, name, {t: len(a[name]) + UPLOAD_SLACK for t, a in artifacts.items()})

    def accept(self, info: RoundInfo) -> Accept:
        """What the grid puts every result of round `info` through (the logic's check)."""
        return lambda result: self.logic.check(info, result)

    def _clock(self, plan: RoundPlan, delivery: Delivery) -> tuple[list[int], float]:
        """Each result's simulated arrival: local training plus the bytes it moved, at its device's speed."""
        assert self.devices is not None
        generator_phase = plan.info.phase == GENERATOR
        seconds = {}
        for c, result in delivery.results.items():
            sent = sum(len(b) for b in plan.artifacts[plan.tiers[c]].values())
            seconds[c] = self.devices.client_seconds(c, result.num_samples * self._epochs[generator_phase],
                                                     sent + delivery.upload_bytes[c], generator_phase)
        return self.devices.close_round(seconds)

    # ------------------------------------------------------------------ checkpoints
    def elapsed_s(self) -> float:
        """Wall time of the whole run, across restarts."""
        return self.elapsed_before + time.monotonic() - self.started

    def save_checkpoint(self) -> None:
        """The global state, the schedule, the grid's registrations and the device clock, atomically."""
        if self.checkpoint_path is None:
            return
        arrays, logic_meta = self.logic.snapshot()
        meta = {"completed": self.federation.completed, "elapsed_s": self.elapsed_s(), "logic": logic_meta,
                "clock": self.devices.clock_state() if self.devices is not None else None, **self.grid.state()}
        checkpoint.save(self.checkpoint_path, arrays, meta)

    def _load(self, path: Path) -> None:
        arrays, meta = checkpoint.load(path)
        try:  # a digest is not a signature: a file made to match it may still lack or twist any field
            completed = int(meta["completed"])
            if not 0 <= completed <= self.federation.total_rounds:
                raise ValueError(f"{completed} rounds completed, of {self.federation.total_rounds}")
            self.grid.restore(meta)
            self.logic.restore(arrays, meta["logic"], completed)
            if self.devices is not None:
                self.devices.restore_clock(meta["clock"])
            self.elapsed_before = float(meta["elapsed_s"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GeflError(f"the checkpoint {path} is malformed ({type(exc).__name__}: {exc}); restore it from a "
                            "backup, or move it away to start afresh") from None
        self.federation.completed = self._resumed_at = completed
