"""The round logic of a training federation: gefl's algorithm, the global state, evaluation on
the test set, the scoreboard and the run directory. `gefl simulate` and the aggregator both hand
it to the one RoundLoop (gefl.rounds.loop); only the evaluator differs (the simulation's worker pool, or
this process on an aggregator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import yaml

from gefl.algorithms import Algorithm, ClientResult, GlobalState, make_algorithm
from gefl.config import Config, to_dict
from gefl.data import Dataset
from gefl.errors import GeflError
from gefl.protocol import RegisterRequest
from gefl.protocol.wire import encode_state
from gefl.rounds.checkpoint import restore_global_state, state_arrays
from gefl.rounds.federation import Phase, RoundInfo
from gefl.rounds.rundir import RunDir
from gefl.rounds.scoreboard import Scoreboard, format_accuracy
from gefl.tiers.devices import DEVICES_PATH, DeviceProfile, Policy, load_catalogue, load_profiles, select_tier
from gefl.tiers.models import count_parameters, get_model

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Accuracy of each tier's encoded global model on the test set (gefl.simulation.executor's)."""

    def evaluate(self, models: dict[str, bytes]) -> dict[str, float]: ...


class TrainingLogic:
    """The round logic of a training federation (a gefl.rounds.loop.RoundLogic).

    `tiers`: the federation's tiers in the order their models are initialised (default: the
    config's); `used`: those known to take part from the start (a simulation knows every client's),
    else each counts from its first round. `evaluator` evaluates the global models on the test set."""

    def __init__(self, cfg: Config, dataset: Dataset, run: RunDir, *, evaluator: Evaluator,
                 tiers: list[str] | None = None, used: list[str] | None = None, algorithm: Algorithm | None = None,
                 extras: Callable[[], dict] | None = None) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.run = run
        self.extras = extras or (lambda: {})
        """More keys for summary.json, asked for at the end (the simulated devices' totals)."""
        self.federation = cfg.name
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.algorithm = algorithm or make_algorithm(cfg)
        self.tiers = tiers or list(dict.fromkeys(cfg.tiers))
        self.state = self.algorithm.init_state(self.tiers, dataset.in_channels, dataset.num_classes)
        self.params = {t: count_parameters(get_model(t, dataset.in_channels, dataset.num_classes)) for t in self.tiers}
        self.used_tiers: list[str] = list(used or [])
        self.scores = Scoreboard(self._scored())
        self._evaluator = evaluator
        self._catalogue = load_catalogue()  # read once: --tier auto registrations consult it
        self._memory_fraction = load_profiles(DEVICES_PATH)[1].memory_fraction
    def _scored(self) -> list[str]:
        return [t for t in self.tiers if t in self.used_tiers]

    def phases(self) -> list[Phase]:
        return self.algorithm.phases()

    def choose_tier(self, request: RegisterRequest) -> tuple[str, str]:
        if request.tier != "auto":
            if request.tier not in self.tiers:
                raise GeflError(f"tier {request.tier!r} is not offered by this federation; it offers "
                                f"{', '.join(self.tiers)} (or ask for 'auto')")
            return request.tier, f"{request.tier}: asked for by the client"
        device = DeviceProfile.from_probe(request.profile, request.name)
        policy = Policy(deadline_s=self.cfg.network.round_timeout,
                        samples_per_round=request.num_samples * self.cfg.train.local_epochs,
                        memory_fraction=self._memory_fraction)
        # The client's probe says whether its torch can use a GPU; that decides which build's memory it pays.
        choice = select_tier(self.tiers, device.memory_available_mb, device.train_samples_per_s, policy,
                             self._catalogue, cuda=device.cuda)
        return choice.tier, choice.reason

    def begin_round(self, info: RoundInfo) -> None:
        self.state = self.algorithm.prepare_round(info.phase, self.state, self.dataset.num_classes)

    def artifacts(self, info: RoundInfo, tier: str) -> dict[str, bytes]:
        if tier not in self.used_tiers:
            self.used_tiers.append(tier)
        return self.algorithm.round_artifacts(info, self.state, tier)

    def check(self, info: RoundInfo, result: ClientResult) -> ClientResult:
        self.algorithm.check_result(result, self.state)
        return result

    def end_round(self, info: RoundInfo, results: dict[int, ClientResult], record: dict) -> str:
        ordered = list(results.values())
        self.state = self.algorithm.aggregate(info.phase, self.state, ordered)
        record["loss"] = float(np.mean([r.loss for r in ordered]))
        self.scores.add_traffic(info.phase, record["bytes"])
        text = f"  loss {record['loss']:.4f}"
        if info.evaluate:
            self.scores.tiers = self._scored()
            record.update(self.scores.record(info.number, self._evaluator.evaluate(
                {t: encode_state(self.state.models[t]) for t in self.scores.tiers})))
            text += format_accuracy(record)
        return text

    def record(self, record: dict) -> None:
        self.run.append_metrics(record)

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = state_arrays(self.state)
        return arrays, {"scores": self.scores.to_dict(), "used_tiers": self.used_tiers}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict, completed: int) -> None:
        self.state = restore_global_state(arrays, self.algorithm, self.state, self.dataset.in_channels,
                                          self.dataset.num_classes)
        self.scores = Scoreboard.from_dict(meta["scores"])
        self.used_tiers = [str(t) for t in meta["used_tiers"]]
        self.run.truncate_metrics(completed)

    def summary(self, wall_s: float) -> dict:
        """The run's summary.json: per-tier accuracy, traffic, the wall time `wall_s`."""
        tiers = self._scored() or self.tiers
        self.scores.tiers = tiers
        rounds = sum(p.rounds for p in self.phases())
        return {**self.scores.summary(self.cfg, rounds, wall_s, {t: self.params[t] for t in tiers},
                                      str(self.run.path)), "eval_split": self.cfg.eval.split, **self.extras()}

    def finish(self, clients: list[dict], wall_s: float) -> None:
        summary = self.summary(wall_s)
        tiers = list(summary["tiers"])
        self.run.save_weights(GlobalState({t: self.state.models[t] for t in tiers}, self.state.generator),
                              self.dataset, self.cfg)
        self.run.write_json("partition.json", clients)
        self.run.write_json("summary.json", summary)
        log.info(format_summary(summary))


def format_summary(summary: dict) -> str:
    rows = [f"{'tier':<10}{'params':>9}{'best %':>9}{'final %':>9}"]
    for tier, s in summary["tiers"].items():
        rows.append(f"{tier:<10}{s['params']:>9,}{s['best_acc']:>9.2f}{s['final_acc']:>9.2f}")
    rows.append(f"{'mean':<10}{'':>9}{summary['mean_best_acc']:>9.2f}{summary['mean_final_acc']:>9.2f}")
    rows.append(f"{summary['algorithm']} on {summary['dataset']}: {summary['rounds']} rounds in "
                f"{summary['wall_time_s']:.0f}s; run directory {summary['run_dir']}")
    return "\n".join(rows)
