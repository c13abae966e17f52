"""Aggregation rules as pure functions over state dicts.

Nothing here knows about rounds, transports or models: inputs are state dicts and weights,
outputs are new state dicts, so the rules are easy to check against hand-computed values and
the aggregator can call them on whatever arrived over the network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """One client's result: its tier, new weights and how many samples they were trained on."""

    tier: str
    state: StateDict
    num_samples: int


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted mean of the floating-point entries; integer entries (BatchNorm's batch counter)
    take the maximum, since averaging a counter has no meaning. `weights=None` is the plain mean.
    """
    if not states:
        raise ValueError("fedavg needs at least one state dict")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if s.keys() != states[0].keys():
            raise ValueError(f"state dict {i} has different keys from state dict 0")
    w = torch.as_tensor([1.0] * len(states) if weights is None else weights, dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("fedavg weights must be non-negative, one per state dict, not all zero")
    w = w / w.sum()
    out: StateDict = {}
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for wi, s in zip(w.tolist(), states):
                acc += wi * s[k].to(torch.float64)
            out[k] = acc.to(first.dtype)
        else:
            out[k] = torch.stack([s[k] for s in states]).amax(0)
    return out


def nonfinite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point entries holding NaN or infinity: such an update must never be averaged."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _weights(updates: Sequence[Update], weighted: bool) -> list[float] | None:
    return [float(u.num_samples) for u in updates] if weighted else None


def per_architecture(updates: Sequence[Update], weighted: bool = True) -> dict[str, StateDict]:
    """FedAvg within each tier; tiers share nothing. Tiers without updates are absent."""
    by_tier: dict[str, list[Update]] = defaultdict(list)
    for u in updates:
        by_tier[u.tier].append(u)
    return {tier: fedavg([u.state for u in us], _weights(us, weighted)) for tier, us in by_tier.items()}


def lg_fedavg(updates: Sequence[Update], shared_prefix: str = "fe.", weighted: bool = True) -> dict[str, StateDict]:
    """LG-FedAvg: entries under `shared_prefix` (the common FE) are averaged over every client,
    the rest within each tier."""
    out = per_architecture(updates, weighted)
    shared_keys = [k for k in updates[0].state if k.startswith(shared_prefix)] if updates else []
    if shared_keys:
        shared = fedavg([{k: u.state[k] for k in shared_keys} for u in updates], _weights(updates, weighted))
        for state in out.values():
            state.update({k: v.clone() for k, v in shared.items()})
    return out
