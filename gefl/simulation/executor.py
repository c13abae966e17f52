"""Where simulated clients run: in this process, or in a pool of single-threaded workers.

These networks are tiny (10-110 k parameters) and batches small, so one PyTorch op cannot keep
two cores busy; running clients side by side, one thread each, is faster than one client on all
threads (benchmarks/workers.py measures both; results in benchmarks/results/workers.md). Workers are
forked so they share the dataset tensors and the tier and dataset registries with this process,
including tiers a user registered in their own script. Tasks and results travel as the same
encoded bytes the network transports carry.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from gefl.algorithms import Algorithm, ClientResult, ClientTask
from gefl.algorithms.training import accuracy
from gefl.data import Split
from gefl.protocol.wire import decode_state
from gefl.tiers.models import get_model

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkerContext:
    algorithm: Algorithm
    clients: dict[int, Split]
    test: Split
    num_classes: int
    eval_batch_size: int

    def to(self, device: torch.device) -> WorkerContext:
        """The same context with its data on `device` (a Ray actor's, which the driver may not have)."""
        def move(split: Split) -> Split:
            return Split(split.images.to(device), split.labels.to(device))

        return WorkerContext(self.algorithm, {c: move(s) for c, s in self.clients.items()}, move(self.test),
                             self.num_classes, self.eval_batch_size)

    def run(self, task: ClientTask) -> ClientResult:
        return self.algorithm.client_step(task, self.clients[task.client_id], self.num_classes)

    def evaluate(self, tier: str, state: bytes) -> float:
        model = get_model(tier, self.test.images.shape[1], self.num_classes).to(self.test.images.device)
        model.load_state_dict(decode_state(state))
        return accuracy(model, self.test.images, self.test.labels, self.eval_batch_size)


class Executor(Protocol):
    """Where client tasks and evaluations run."""

    workers: int
    """How many clients train at once."""

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]: ...

    def evaluate(self, models: dict[str, bytes]) -> dict[str, float]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs everything in this process, one client after another.

    `threads`: PyTorch threads while it does (None: this process's setting). The worker pool's
    are single-threaded, and the thread count changes the order of floating-point sums: standing
    in for the pool, one thread gives the pool's results exactly."""

    workers = 1

    def __init__(self, ctx: WorkerContext, threads: int | None = None) -> None:
        self.ctx = ctx
        self.threads = threads

    def _on_threads(self, work: Callable[[], T]) -> T:
        if self.threads is None:
            return work()
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return work()
        finally:
            torch.set_num_threads(before)

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        return self._on_threads(lambda: [self.ctx.run(t) for t in tasks])

    def evaluate(self, models: dict[str, bytes]) -> dict[str, float]:
        return self._on_threads(lambda: {tier: self.ctx.evaluate(tier, state) for tier, state in models.items()})

    def close(self) -> None:
        pass


_CTX: WorkerContext | None = None


def _init_worker(ctx: WorkerContext) -> None:
    global _CTX
    torch.set_num_threads(1)
    _CTX = ctx


def _context() -> WorkerContext:
    if _CTX is None:  # not an assert: those vanish under python -O
        raise RuntimeError("a worker ran a task before its pool initialiser set its context")
    return _CTX


def _run(task: ClientTask) -> ClientResult:
    return _context().run(task)


def _evaluate(tier: str, state: bytes) -> float:
    return _context().evaluate(tier, state)


class ProcessExecutor:
    """A fork pool of single-threaded workers; results come back in task order."""

    def __init__(self, ctx: WorkerContext, workers: int) -> None:
        self.workers = workers
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(ctx,),
        )

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        futures: list[Future] = [self.pool.submit(_run, t) for t in tasks]
        return [f.result() for f in futures]

    def evaluate(self, models: dict[str, bytes]) -> dict[str, float]:
        futures = {tier: self.pool.submit(_evaluate, tier, state) for tier, state in models.items()}
        return {tier: f.result() for tier, f in futures.items()}

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def default_workers(num_clients: int) -> int:
    return max(1, min(os.cpu_count() or 1, num_clients))


def forked_children_can_train() -> bool:
    """Whether a process forked from this one can run a backward pass.

    PyTorch refuses autograd in a forked child once the parent's autograd engine has set up its
    device threads ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"); which earlier work in a process does that is PyTorch's business, and a
    script or notebook that trained something before calling `simulate` may have. Asking a
    forked child costs a few milliseconds and is the only check that cannot be wrong."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            torch.ones(1, requires_grad=True).sum().backward()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def make_executor(ctx: WorkerContext, workers: int, device: torch.device) -> Executor:
    """A pool on CPU when more than one worker is asked for and forked workers can train; else in-process."""
    if workers > 1 and device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods():
        if forked_children_can_train():
            return ProcessExecutor(ctx, workers)
        log.warning(f"running the clients in this process instead of {workers} worker processes: PyTorch cannot "
                    "train in a process forked from this one (its autograd was set up here before, see "
                    "https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork). The results are the same, only "
                    "slower; start the simulation in a fresh process (`gefl simulate`) for the workers")
        return LocalExecutor(ctx, threads=1)
    return LocalExecutor(ctx)
