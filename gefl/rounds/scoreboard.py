"""Per-tier accuracy over a run and the summary built from it, the same for every driver.

The paper's metric is each architecture's best test accuracy over the evaluated rounds, averaged
over architectures; the in-process simulator and the networked aggregator both keep it here, so
their summary.json files mean the same thing. Plain JSON state, so a checkpoint can carry it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gefl.config import Config
from gefl.rounds.federation import mean_by_name


@dataclass
class Scoreboard:
    tiers: list[str]
    best: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    evaluations: list[int] = field(default_factory=list)
    traffic: dict[str, list[dict]] = field(default_factory=dict)
    """Per phase, each round's bytes per client (round_traffic)."""

    def record(self, round_number: int, accuracy: dict[str, float]) -> dict:
        """Note one evaluation; returns the fields it adds to the round's metrics record."""
        for tier, acc in accuracy.items():
            self.best[tier] = max(self.best.get(tier, 0.0), acc)
            self.final[tier] = acc
        self.evaluations.append(round_number)
        return {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values())))}

    def add_traffic(self, phase: str, traffic: dict) -> None:
        self.traffic.setdefault(phase, []).append(traffic)

    def mean_traffic(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per phase: mean bytes per client per round, down and up, per artifact."""
        return {phase: {d: mean_by_name([r[d] for r in rounds]) for d in ("down", "up")}
                for phase, rounds in self.traffic.items()}

    def summary(self, cfg: Config, rounds: int, wall_time_s: float, params: dict[str, int], run_dir: str) -> dict:
        return {
            "name": cfg.name,
            "algorithm": cfg.algorithm,
            "dataset": cfg.dataset,
            "num_clients": cfg.num_clients,
            "seed": cfg.seed,
            "rounds": rounds,
            "evaluated_rounds": list(self.evaluations),
            "wall_time_s": round(wall_time_s, 2),
            "tiers": {t: {"best_acc": self.best.get(t, 0.0), "final_acc": self.final.get(t, 0.0), "params": params[t]}
                      for t in self.tiers},
            "mean_best_acc": float(np.mean([self.best.get(t, 0.0) for t in self.tiers])),
            "mean_final_acc": float(np.mean([self.final.get(t, 0.0) for t in self.tiers])),
            "bytes_per_client_per_round": self.mean_traffic(),
            "run_dir": run_dir,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scoreboard:
        return cls(list(data["tiers"]), dict(data["best"]), dict(data["final"]), list(data["evaluations"]),
                   {phase: list(rounds) for phase, rounds in data.get("traffic", {}).items()})


def format_accuracy(record: dict) -> str:
    acc = record["accuracy"]
    return f"  acc mean {record['mean_accuracy']:.2f} (min {min(acc.values()):.1f}, max {max(acc.values()):.1f})"
