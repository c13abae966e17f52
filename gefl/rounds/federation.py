"""The federation's state machine: phases, rounds, who takes part, which results count; and the
task a client gets and the result it sends back, weights as encoded bytes.

It imports no torch and knows no transport. The simulation drives it in-process; an aggregator
service drives the same object from network callbacks. A round is opened, results are submitted
by client id for that round id, and the round is closed; anything that does not belong to the
open round is refused with a reason, so late or duplicate results can never be counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass(frozen=True)
class Phase:
    name: str
    rounds: int
    trains_classifiers: bool
    """Whether the classifiers change in this phase (and so are evaluated)."""


@dataclass(frozen=True)
class RoundInfo:
    number: int
    """1-based over the whole run; the round id results must carry."""
    phase: str
    phase_round: int
    phase_rounds: int
    participants: tuple[int, ...]
    evaluate: bool
    """Evaluate the classifiers after this round: phase round 1, every k-th and the phase's last."""


WARMUP, TRAIN, GENERATOR, HEAD = "warmup", "train", "generator", "head"


@dataclass(frozen=True)
class ClientTask:
    """What a client receives for one round. Weights travel encoded, as they would on the wire."""

    round: int
    phase: str
    client_id: int
    tier: str
    seed: int
    model: bytes
    generator: bytes | None = None
    teachers: bytes | None = None
    """AvgKD: the other tiers' models, as one state dict with keys '<tier>/<entry>'."""

    @classmethod
    def from_artifacts(cls, round: int, phase: str, client_id: int, tier: str, seed: int,
                       artifacts: dict[str, bytes]) -> ClientTask:
        """A task from the artifacts `Algorithm.round_artifacts` made for the client's tier."""
        return cls(round, phase, client_id, tier, seed, artifacts["model"], artifacts.get("generator"),
                   artifacts.get("teachers"))


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    tier: str
    phase: str
    state: bytes
    """The trained tier model, or the trained generator in the generator phase."""
    num_samples: int
    loss: float


def task_seed(seed: int, round_number: int, client_id: int) -> int:
    """The seed of one client's work in one round: the same wherever the client runs."""
    return int(np.random.default_rng([seed, round_number, client_id]).integers(2**31))


def mean_by_name(sizes: list[dict[str, int]]) -> dict[str, int]:
    """Per name, the mean over the dicts that have it (rounded to whole bytes)."""
    names = dict.fromkeys(name for s in sizes for name in s)
    return {name: round(float(np.mean([s[name] for s in sizes if name in s]))) for name in names}


def round_traffic(down: list[dict[str, int]], up: list[dict[str, int]]) -> dict[str, dict[str, int]]:
    """One round's bytes per client, both directions, per artifact: `down` has one {artifact: bytes}
    per participant (what its task carried), `up` one per result that counted."""
    return {"down": mean_by_name(down), "up": mean_by_name(up)}


class RoundError(Exception):
    """A result that does not belong to the open round (late, duplicate, not a participant)."""


@dataclass
class Federation(Generic[R]):
    phases: Sequence[Phase]
    num_clients: int
    client_fraction: float = 1.0
    seed: int = 0
    eval_every: int = 10
    completed: int = 0
    """Rounds closed so far; with `phases` this is the whole state needed to resume."""
    _open: RoundInfo | None = field(default=None, init=False)
    _results: dict[int, R] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.num_clients < 1:
            raise ValueError("a federation needs at least one client")

    @property
    def total_rounds(self) -> int:
        return sum(p.rounds for p in self.phases)

    @property
    def finished(self) -> bool:
        return self.completed >= self.total_rounds

    @property
    def current(self) -> RoundInfo | None:
        return self._open

    def _locate(self, number: int) -> tuple[Phase, int]:
        start = 0
        for phase in self.phases:
            if number <= start + phase.rounds:
                return phase, number - start
            start += phase.rounds
        raise RoundError(f"round {number} is past the last round {self.total_rounds}")

    def sample_clients(self, number: int, available: Sequence[int] | None = None) -> tuple[int, ...]:
        """Participants of round `number` among `available` clients (default: all): a seeded draw,
        so a resumed run with the same clients picks the same ones."""
        pool = sorted(available) if available is not None else list(range(self.num_clients))
        k = max(1, round(self.client_fraction * len(pool)))
        if k >= len(pool):
            return tuple(pool)
        rng = np.random.default_rng([self.seed, number])
        return tuple(sorted(int(pool[i]) for i in rng.choice(len(pool), size=k, replace=False)))

    def open_round(self, available: Sequence[int] | None = None) -> RoundInfo:
        """Open the next round; a networked aggregator passes the clients that are online."""
        if available is not None and not available:
            raise RoundError("no clients are available to take part")
        if self._open is not None:
            raise RoundError(f"round {self._open.number} is still open")
        if self.finished:
            raise RoundError("the federation has finished all its rounds")
        number = self.completed + 1
        phase, phase_round = self._locate(number)
        evaluate = phase.trains_classifiers and (
            phase_round == 1 or phase_round % self.eval_every == 0 or phase_round == phase.rounds
        )
        self._open = RoundInfo(number, phase.name, phase_round, phase.rounds, self.sample_clients(number, available),
                               evaluate)
        self._results = {}
        return self._open

    def submit(self, client_id: int, round_number: int, result: R) -> None:
        info = self._open
        if info is None or round_number != info.number:
            open_number = info.number if info else "none"
            raise RoundError(f"result for round {round_number} refused: the open round is {open_number}")
        if client_id not in info.participants:
            raise RoundError(f"client {client_id} is not a participant of round {info.number}")
        if client_id in self._results:
            raise RoundError(f"client {client_id} already submitted for round {info.number}")
        self._results[client_id] = result

    @property
    def received(self) -> list[int]:
        return sorted(self._results)

    @property
    def missing(self) -> list[int]:
        return [c for c in self._open.participants if c not in self._results] if self._open else []

    def close_round(self) -> dict[int, R]:
        """Close the open round and return its results by client id (in client order)."""
        if self._open is None:
            raise RoundError("no round is open")
        if not self._results:
            raise RoundError(f"round {self._open.number} has no results to close with")
        results = dict(sorted(self._results.items()))
        self._open, self._results = None, {}
        self.completed += 1
        return results

    def skip_round(self) -> None:
        """Close the open round without results (every participant missed its deadline): the
        global state stays as it was and the schedule moves on."""
        if self._open is None:
            raise RoundError("no round is open")
        self._open, self._results = None, {}
        self.completed += 1

    def abandon_round(self) -> None:
        """Drop the open round and its results without counting it (too few results for the
        quorum): the next open_round runs the same round again from the same global state."""
        if self._open is None:
            raise RoundError("no round is open")
        self._open, self._results = None, {}
