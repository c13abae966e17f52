"""Simulated clients as Ray actors: a simulation that outgrows one machine (`executor: ray`).

Ray (the `ray` extra) places the actors on whatever cluster it is given: a local instance started
for the run, or a running cluster (`ray start --head`, then `ray start --address` on each other
machine). Rather than grow cluster code of its own, gefl-edge uses Ray's scheduling, object store
and failure detection, as Flower's simulation does.

Actors, not tasks: each actor receives the whole `WorkerContext` (every client's data, the
evaluation split, the algorithm) once, through Ray's object store, and keeps it for the run; a
round then ships only its tasks (the round's artifacts as the encoded bytes the network
transports carry) and brings back encoded results. Any actor can train any client, so the
round's tasks go to whichever actor is free, largest first, as in the local pool; each actor
trains on `ray.cpus` PyTorch threads (one by default, which gives the pool's results bit for bit).

An actor that dies mid-round (its process killed, its node lost) is the simulated counterpart of
a board that dropped out: its client's result is missing, the round closes on what arrived by the
round loop's rules, and the dead actor is replaced once the cluster has room for it. An
evaluation on a dead actor runs again on another, since it changes no state.

Ray's own protocol serialises calls with pickle and trusts whatever can reach the cluster's ports
(Ray's documentation says so): run a cluster on a private network only. What gefl-edge itself
sends through it is bytes and plain dataclasses, the same as over the local pool's pipes.
Tiers a script registers at run time are not known to Ray workers on other machines: put the
registration in a module the workers import.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from gefl.algorithms import ClientResult, ClientTask
from gefl.errors import GeflError
from gefl.schema import RayConfig
from gefl.simulation.executor import WorkerContext

log = logging.getLogger(__name__)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise GeflError("executor 'ray' needs Ray: pip install 'gefl-edge[ray]' (or set executor: local, the "
                        "worker processes of this machine)") from exc
    return ray


def _join_error(address: str, exc: Exception) -> GeflError:
    return GeflError(f"could not join the Ray cluster at ray.address {address!r}: {exc}; start one with "
                     "`ray start --head`, or set ray.address to '' for a Ray instance of this run's own")


def _check_reachable(address: str) -> None:
    """Fail at once where nothing listens at HOST:PORT: Ray itself keeps retrying a missing head for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise GeflError(f"ray.address must be '', 'auto' or HOST:PORT (the head's `ray start --head --port`), "
                        f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise _join_error(address, exc) from exc


class _ClientActor:
    """One Ray worker process holding the whole context; trains whichever client it is given."""

    def __init__(self, ctx: WorkerContext, threads: int, device: str) -> None:
        torch.set_num_threads(threads)
        self.ctx = ctx.to(torch.device(device))

    def run(self, task: ClientTask) -> ClientResult:
        return self.ctx.run(task)

    def evaluate(self, tier: str, state: bytes) -> float:
        return self.ctx.evaluate(tier, state)

    def pid(self) -> int:
        """Its process id (tests kill one to show a worker lost mid-run)."""
        return os.getpid()


class RayExecutor:
    """The round's tasks on Ray actors; results in task order, a dead actor's task left out."""

    def __init__(self, ctx: WorkerContext, settings: RayConfig, workers: int | None, num_clients: int) -> None:
        self.ray = ray = _import_ray()
        self.settings = settings
        self.device = "cuda" if settings.gpus > 0 else "cpu"
        self._own = not ray.is_initialized()
        if self._own:
            # "local" starts a fresh instance even where `ray start` left one running; "" is ours for that.
            address = settings.address or "local"
            if address not in ("local", "auto"):
                _check_reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                         **({"num_cpus": os.cpu_count()} if address == "local" else {}))
            except ConnectionError as exc:
                raise _join_error(settings.address, exc) from exc
        resources = ray.cluster_resources()
        room = self._room(resources)
        if room < 1:
            self.close()
            raise GeflError(f"the Ray cluster has {resources.get('CPU', 0):g} CPU(s) and {resources.get('GPU', 0):g} "
                            f"GPU(s): not enough for one client actor of ray.cpus {settings.cpus:g} and ray.gpus "
                            f"{settings.gpus:g}")
        self.workers = max(1, min(workers or room, num_clients))
        self._ctx = ray.put(ctx)  # shipped once; every actor (and a replacement) reads it from the object store
        self._actor_class = ray.remote(_ClientActor)
        self.actors: list[Any] = []
        self._refill()

    def _room(self, resources: dict[str, float]) -> int:
        """How many client actors of `ray.cpus` and `ray.gpus` fit in these resources."""
        room = int(resources.get("CPU", 0) // self.settings.cpus)
        if self.settings.gpus > 0:
            room = min(room, int(resources.get("GPU", 0) // self.settings.gpus))
        return room

    def _new_actor(self) -> Any:
        return self._actor_class.options(num_cpus=self.settings.cpus, num_gpus=self.settings.gpus).remote(
            self._ctx, max(1, int(self.settings.cpus)), self.device)

    def _refill(self) -> None:
        """Bring the actors back up to `workers`, as far as the cluster has room (never an actor that would
        wait for resources: a call to it would hang the round)."""
        missing = self.workers - len(self.actors)
        if missing <= 0:
            return
        room = self._room(self.ray.available_resources())
        if self.actors and room < missing:
            log.warning(f"Ray: {len(self.actors)} of {self.workers} client actors alive, room for {max(room, 0)} more")
        self.actors += [self._new_actor() for _ in range(min(missing, room) if self.actors else missing)]

    def _lost(self, actor: Any, what: str, exc: Exception) -> None:
        log.warning(f"Ray: the actor running {what} died ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                    "it is replaced once the cluster has room")
        if actor in self.actors:
            self.actors.remove(actor)

    def _map(self, calls: list[tuple[str, Callable[[Any], Any]]], retry: bool) -> dict[int, Any]:
        """Run calls[i] (a description and `actor -> object ref`) on free actors; results by index. A call
        whose actor dies is left out, or with `retry` run again on another actor."""
        ray = self.ray
        self._refill()
        pending = list(range(len(calls)))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}
        results: dict[int, Any] = {}
        tries = [0] * len(calls)
        while pending or running:
            while idle and pending:
                actor, i = idle.pop(), pending.pop(0)
                running[calls[i][1](actor)] = (actor, i)
            if not running:
                self._refill()
                idle = list(self.actors)
                if not idle:
                    raise GeflError(f"every Ray client actor of this run has died and the cluster has no room "
                                    f"for another ({ray.available_resources()}): see the Ray logs")
                continue
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the client's own code raised: as in the local pool
                raise exc.as_instanceof_cause() from None
            except ray.exceptions.RayError as exc:  # the actor's process or node is gone
                self._lost(actor, calls[i][0], exc)
                tries[i] += 1
                if retry and tries[i] >= 3:
                    raise GeflError(f"Ray: {calls[i][0]} lost its actor three times; see the Ray logs") from exc
                if retry:
                    pending.append(i)
                continue
            idle.append(actor)
        return results

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        results = self._map([(f"client {t.client_id}", lambda a, t=t: a.run.remote(t)) for t in tasks], retry=False)
        dropped = [t.client_id for i, t in enumerate(tasks) if i not in results]
        if dropped:
            log.warning(f"Ray: client(s) {dropped} lost with their actor this round: counted as dropped")
        return [results[i] for i in sorted(results)]

    def evaluate(self, models: dict[str, bytes]) -> dict[str, float]:
        tiers = list(models)
        results = self._map([(f"the evaluation of {tier}", lambda a, tier=tier: a.evaluate.remote(tier, models[tier]))
                             for tier in tiers], retry=True)
        return {tier: results[i] for i, tier in enumerate(tiers)}

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._own:
            self.ray.shutdown()
