"""The client runtime: register, then train whatever the aggregator asks, round after round.

A client keeps no state between rounds (every task brings the global weights it needs), so it can
lose the aggregator, or be restarted itself, at any moment: it retries with exponential backoff
and jitter while the aggregator is away, registers again if the aggregator forgot it, and picks up
whichever round is open when it is back. Its heartbeat stream runs on a thread beside training.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from gefl.edge_client.credentials import CredentialStore
from gefl.edge_client.transport import ClientTransport, Unauthenticated, Unavailable

from gefl.errors import GeflError
from gefl.image_folder import read_image_folder
from gefl.protocol import (
    FINISHED,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    TRAIN,
    Refused,
    RegisterRequest,
    Registration,
    TaskInfo,
    UploadHeader,
)
from gefl.protocol.wire import sha256

log = logging.getLogger(__name__)

T = TypeVar("T")
Say = Callable[[str], None]


class Backoff:
    """Exponential backoff with jitter: waits of base x 2^n, capped, each drawn from [d/2, d], so a
    hundred clients that lost the aggregator at once do not all come back in the same instant."""

    def __init__(self, base: float = 0.5, cap: float = 10.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class ClientOptions:
    data_dir: Path
    tier: str = "auto"
    name: str | None = None
    """Stable name of this device (default: the hostname); registering again under it keeps the client id."""
    threads: int | None = None
    poll_s: float = 10.0
    give_up_s: float | None = None
    """Stop when the aggregator has been unreachable this long (None: keep trying)."""
    state_dir: Path | None = None
    """Where this device keeps its registration's credential (default: credentials.default_state_dir())."""
    share_label_histogram: bool = False
    """Send the label histogram at registration: a board's label distribution is private, and no
    algorithm needs it, so only when the user opts in."""


class ClientRuntime:
    def __init__(self, transport: ClientTransport, options: ClientOptions) -> None:
        self.transport = transport
        self.options = options
        self.backoff = Backoff()
        self.stop = threading.Event()
        self.rounds_trained = 0
        self._unreachable_since: float | None = None
        self.credentials = CredentialStore(options.state_dir)
        self._refused_rounds: set[int] = set()
        """Rounds whose result the aggregator refused for what it holds (a rerun of the same round
        would compute the same result from the same task seed and global state): not trained again."""
        self.refusal_backoff = Backoff(base=1.0, cap=30.0)
        self._reg: Registration | None = None
        """The latest registration (the heartbeat thread reads its interval)."""

    # ------------------------------------------------------------------ retries
    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()` until it gets through; an Unavailable aggregator is waited for with backoff."""
        while True:
            try:
                value = call()
            except Unavailable as exc:
                now = time.monotonic()
                self._unreachable_since = self._unreachable_since or now
                if self.options.give_up_s is not None and now - self._unreachable_since > self.options.give_up_s:
                    raise GeflError(f"gave up: the aggregator at {self.transport.address} has been unreachable for "
                                    f"{now - self._unreachable_since:.0f} s ({exc})") from exc
                delay = self.backoff.next_delay()
                log.warning(f"{what}: {exc}; retrying in {delay:.1f} s")
                time.sleep(delay)
                continue
            self._unreachable_since = None
            self.backoff.reset()
            return value

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Take part until the run is finished; returns the number of rounds this client trained."""
        opts = self.options
        images, labels, classes = read_image_folder(opts.data_dir)  # bad data fails before any network traffic
        name = opts.name or socket.gethostname()
        profile = self._profile() if opts.tier == "auto" else {}
        histogram = np.bincount(labels, minlength=len(classes)).tolist() if opts.share_label_histogram else []
        request = RegisterRequest(name=name, tier=opts.tier, profile=profile, num_samples=len(images),
                                  label_histogram=tuple(histogram))
        # torch's import takes seconds on a board (tens under emulation) and holds the GIL while it
        # loads its libraries, so no heartbeat could go out meanwhile: pay for it before registering,
        # while the aggregator does not yet count this client, and start the heartbeats right after.
        importlib.import_module("gefl.algorithms")
        reg = self._reg = self._register(request)
        heartbeat = threading.Thread(target=self._heartbeats, name="gefl-heartbeat", daemon=True)
        heartbeat.start()
        try:
            cfg, split, algorithm, num_classes = self._prepare(reg, images, labels, classes)
            while True:
                try:
                    task = self._retrying("fetch task", lambda: self.transport.fetch_task(opts.poll_s))
                except Unauthenticated:
                    new = self._reg = self._register(request)
                    if (new.federation, new.config_yaml) != (reg.federation, reg.config_yaml):
                        # An aggregator that forgot this client may serve another run now: its config,
                        # dataset and algorithm are what the next tasks need, not the first registration's.
                        log.warning(f"federation {new.federation!r} runs another config than the one this client "
                                 "trained for; taking it")
                        cfg, split, algorithm, num_classes = self._prepare(new, images, labels, classes)
                        self._refused_rounds.clear()
                    reg = new
                    continue
                if task.status == FINISHED:
                    log.info(f"the run is finished; this client trained {self.rounds_trained} round(s)")
                    return self.rounds_trained
                if task.status == TRAIN and task.round in self._refused_rounds:
                    # Training it again would give the same result (the task's seed fixes it) and the
                    # same refusal: wait for the next round instead, backing off.
                    self.stop.wait(self.refusal_backoff.next_delay())
                elif task.status == TRAIN:
                    self._train(task, reg, split, algorithm, num_classes)
        finally:
            self.stop.set()
            self.transport.close()

    def _profile(self) -> dict:
        from gefl.edge_client.probe import probe

        profile = probe().to_dict()
        profile["cuda"] = bool(profile.get("cuda"))
        return profile

    def _register(self, request: RegisterRequest) -> Registration:
        """Register, proving with the credential of an earlier registration that the name is ours."""
        address = self.transport.address
        held = self.credentials.load(address, request.name)
        request = dataclasses.replace(request, credential=held)
        reg = self._retrying("register", lambda: self.transport.register(request))
        if reg.token != held:
            self.credentials.save(address, request.name, reg.token)
        log.info(f"registered with {self.transport.address} as client {reg.client_id} ({request.name}) in "
                 f"federation {reg.federation!r}: tier {reg.tier} ({reg.tier_reason})")
        return reg

    def _prepare(self, reg: Registration, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple:
        import torch

        from gefl.algorithms import make_algorithm
        from gefl.config import config_from_yaml
        from gefl.data import dataset_classes, few_steps_warning
        from gefl.image_folder import client_split

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        cfg = config_from_yaml(reg.config_yaml, f"the aggregator at {self.transport.address}")
        num_classes = len(dataset_classes(cfg.dataset))
        split = client_split(images, labels, classes, num_classes, self.options.data_dir)
        if (warning := few_steps_warning([len(split)], cfg.train.batch_size)) is not None:
            log.warning(f"{warning} (the batch size is the aggregator's config)")
        return cfg, split, make_algorithm(cfg), num_classes

    def _heartbeats(self) -> None:
        """Heartbeats at the interval of the latest registration (an aggregator registered with
        again may ask for another one)."""
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self.transport.heartbeats(self._reg.heartbeat_interval_s if self._reg else 2.0, self.stop)
                return
            except (Unavailable, Refused):
                self.stop.wait(backoff.next_delay())

    def _train(self, task: TaskInfo, reg: Registration, split, algorithm, num_classes: int) -> None:
        from gefl.algorithms import ClientTask

        started = time.monotonic()
        try:
            arts = {ref.name: self._retrying(f"download {ref.name}",
                                             lambda r=ref: self.transport.download(task.round, r))
                    for ref in task.artifacts}
        except Refused as exc:
            log.warning(f"round {task.round}: {exc}")
            return
        client_task = ClientTask.from_artifacts(task.round, task.phase, reg.client_id, task.tier, task.seed, arts)
        result = algorithm.client_step(client_task, split, num_classes)
        header = UploadHeader(task.round, task.phase, task.upload_name, len(result.state), sha256(result.state),
                              result.num_samples, result.loss)
        try:
            self._retrying("upload", lambda: self.transport.upload(header, result.state))
        except Refused as exc:
            log.warning(f"round {task.round}: result not counted: {exc}")
            if exc.code in (INVALID_ARGUMENT, RESOURCE_EXHAUSTED):  # about the result itself: it would recur
                self._refused_rounds.add(task.round)
            else:  # a late or damaged upload: the next round (or a rerun of this one) may take it
                self.stop.wait(self.refusal_backoff.next_delay())
            return
        self.refusal_backoff.reset()
        self.rounds_trained += 1
        log.info(f"round {task.round} ({task.phase}): trained {task.tier} on {result.num_samples} samples, "
                 f"loss {result.loss:.4f}, {time.monotonic() - started:.1f}s")
