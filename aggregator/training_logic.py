"""The round logic of a training federation, for the coordinator: gefl's algorithm, the global
state, evaluation on the test set and the run directory `gefl simulate` also writes.

Every step is the simulator's own (gefl.algorithms, gefl.scoreboard, gefl.rundir), so a run
over the network and the same run in-process compute the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import yaml

from gefl.algorithms import GENERATOR, ClientResult, GlobalState, make_algorithm
from gefl.checkpoint import restore_global_state, state_arrays
from gefl.config import Config, to_dict
from gefl.data import Dataset, Split
from gefl.devices import DEVICES_PATH, Policy, load_catalogue, load_profiles, select_tier
from gefl.errors import GeflError
from gefl.executor import LocalExecutor, WorkerContext
from gefl.federation import Phase, RoundInfo
from gefl.models import count_parameters, get_model
from gefl.protocol import RegisterRequest, UploadHeader
from gefl.rundir import RunDir
from gefl.scoreboard import Scoreboard, format_accuracy
from gefl.wire import encode_state

UPLOAD_SLACK = 64 * 1024
"""Bytes an upload may exceed the global artifact it updates by (safetensors header differences)."""


class TrainingLogic:
    def __init__(self, cfg: Config, dataset: Dataset, run: RunDir, say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.run = run
        self.say = say
        self.federation = cfg.name
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.algorithm = make_algorithm(cfg)
        self.tiers = list(dict.fromkeys(cfg.tiers))
        self.state = self.algorithm.init_state(self.tiers, dataset.in_channels, dataset.num_classes)
        self.params = {t: count_parameters(get_model(t, dataset.in_channels, dataset.num_classes)) for t in self.tiers}
        self.scores = Scoreboard([])
        self.used_tiers: list[str] = []
        self._evaluator = LocalExecutor(WorkerContext(
            self.algorithm, {}, Split(dataset.test.images, dataset.test.labels), dataset.num_classes,
            cfg.eval.batch_size))
        self._limits: dict[str, int] = {}
        self._catalogue = load_catalogue()  # read once: --tier auto registrations consult it
        self._memory_fraction = load_profiles(DEVICES_PATH)[1].memory_fraction
        self._round_started = time.monotonic()
        self.started = time.monotonic()
        self.elapsed_before = 0.0

    def phases(self) -> list[Phase]:
        return self.algorithm.phases()

    def choose_tier(self, request: RegisterRequest) -> tuple[str, str]:
        if request.tier != "auto":
            if request.tier not in self.tiers:
                raise GeflError(f"tier {request.tier!r} is not offered by this federation; it offers "
                                f"{', '.join(self.tiers)} (or ask for 'auto')")
            return request.tier, f"{request.tier}: asked for by the client"
        memory = request.profile.get("memory_available_bytes")
        speed = request.profile.get("train_samples_per_s")
        if not memory or not speed:
            raise GeflError("tier 'auto' needs the device's measured profile (memory and training speed); "
                            "run the client with --tier auto on the device itself, or name a tier with --tier")
        policy = Policy(deadline_s=self.cfg.network.round_timeout,
                        samples_per_round=request.num_samples * self.cfg.train.local_epochs,
                        memory_fraction=self._memory_fraction)
        # The client's probe says whether its torch can use a GPU; that decides which build's memory it pays.
        choice = select_tier(self.tiers, memory / 2**20, speed, policy, self._catalogue,
                             cuda=bool(request.profile.get("cuda")))
        return choice.tier, choice.reason

    def begin_round(self, info: RoundInfo) -> None:
        self.state = self.algorithm.prepare_round(info.phase, self.state, self.dataset.num_classes)
        self._limits = {}
        self._round_started = time.monotonic()

    def artifacts(self, info: RoundInfo, tier: str) -> dict[str, bytes]:
        out = self.algorithm.round_artifacts(info, self.state, tier)
        self._limits[tier] = len(out[self.upload_name(info.phase)]) + UPLOAD_SLACK
        if tier not in self.used_tiers:
            self.used_tiers.append(tier)
        return out

    def upload_name(self, phase: str) -> str:
        return "generator" if phase == GENERATOR else "model"

    def upload_limit(self, info: RoundInfo, tier: str) -> int:
        return self._limits[tier]

    def check(self, info: RoundInfo, client_id: int, tier: str, header: UploadHeader, payload: bytes) -> ClientResult:
        result = ClientResult(client_id, tier, info.phase, payload, header.num_samples, header.loss)
        self.algorithm.check_result(result, self.state)
        return result

    def end_round(self, info: RoundInfo, results: dict[int, ClientResult], record: dict) -> str:
        ordered = list(results.values())
        self.state = self.algorithm.aggregate(info.phase, self.state, ordered)
        record["loss"] = float(np.mean([r.loss for r in ordered]))
        self.scores.add_traffic(info.phase, record["bytes"])
        text = f"  loss {record['loss']:.4f}"
        if info.evaluate:
            tiers = [t for t in self.tiers if t in self.used_tiers]
            self.scores.tiers = tiers
            record.update(self.scores.record(info.number, self._evaluator.evaluate(
                {t: encode_state(self.state.models[t]) for t in tiers})))
            text += format_accuracy(record)
        record["seconds"] = time.monotonic() - self._round_started
        self.run.append_metrics(record)
        return text

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = state_arrays(self.state.models, self.state.generator)
        meta = {"scores": self.scores.to_dict(), "used_tiers": self.used_tiers,
                "elapsed_s": time.monotonic() - self.started + self.elapsed_before}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict, completed: int) -> None:
        self.state = restore_global_state(arrays, self.algorithm, self.state, self.dataset.in_channels,
                                          self.dataset.num_classes)
        self.scores = Scoreboard.from_dict(meta["scores"])
        self.used_tiers = list(meta["used_tiers"])
        self.elapsed_before = float(meta["elapsed_s"])
        self.started = time.monotonic()
        self.run.truncate_metrics(completed)

    def finish(self, clients: list[dict]) -> None:
        tiers = [t for t in self.tiers if t in self.used_tiers] or self.tiers
        self.scores.tiers = tiers
        rounds = sum(p.rounds for p in self.phases())
        summary = self.scores.summary(self.cfg, rounds, time.monotonic() - self.started + self.elapsed_before,
                                      {t: self.params[t] for t in tiers}, str(self.run.path))
        summary["transport"] = "network"
        self.run.save_weights(GlobalState({t: self.state.models[t] for t in tiers}, self.state.generator),
                              self.dataset, self.cfg)
        self.run.write_json("partition.json", clients)
        self.run.write_json("summary.json", summary)
        from gefl.simulation import format_summary

        self.say(format_summary(summary))
