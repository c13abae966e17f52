"""Simulated devices for `gefl simulate --devices`: who trains which tier, and a simulated clock.

The training itself is real (every client trains on this machine); only time is simulated, from
the device profiles, so a run on a laptop shows what a mix of Raspberry Pis and Jetsons would
do: which tiers they pick, how long their rounds take, and who misses the deadline. A client's
round time is its local training (samples x epochs at the profile's throughput, scaled by the
tier's or generator's training FLOPs) plus the bytes it actually downloaded and uploaded at the
profile's bandwidth. A result that arrives after the deadline is dropped, as a real aggregator
would drop it, and counted as a straggler of its device class.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from gefl.algorithms import Algorithm, GeneratorAlgorithm
from gefl.errors import GeflError
from gefl.tiers.devices import (
    Catalogue,
    DeviceProfile,
    Policy,
    estimate_round_s,
    load_catalogue,
    load_mix,
    select_tier,
    transfer_s,
)

if TYPE_CHECKING:
    from gefl.config import Config
    from gefl.data import Dataset


@dataclass
class SimulatedClient:
    profile: DeviceProfile
    tier: str
    reason: str


@dataclass
class _ClassStats:
    clients: int = 0
    tiers: set[str] = field(default_factory=set)
    seconds: list[float] = field(default_factory=list)
    stragglers: int = 0
    client_rounds: int = 0


def training_mflops_per_sample(module: torch.nn.Module, loss_fn, batch: int = 16) -> float:
    """FLOPs of one forward and backward pass per sample, counted (not timed), in MFLOPs."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(module, batch).backward()
    return counter.get_total_flops() / batch / 1e6


class DeviceSimulation:
    def __init__(self, devices_path: str, candidates: list[str], samples_per_round: int,
                 catalogue: Catalogue | None = None) -> None:
        profiles, policy = load_mix(devices_path)
        self.catalogue = catalogue or load_catalogue()
        self.policy = Policy(policy.deadline_s, samples_per_round, policy.memory_fraction)
        self.clients: list[SimulatedClient] = []
        for profile in profiles:
            choice = select_tier(candidates, profile.memory_available_mb, profile.train_samples_per_s, self.policy,
                                 self.catalogue, profile.bandwidth_mbps, cuda=profile.cuda)
            self.clients.append(SimulatedClient(profile, choice.tier, choice.reason))
        self.generator_mflops: float | None = None
        self._stats: dict[str, _ClassStats] = {}
        for c in self.clients:
            s = self._stats.setdefault(c.profile.name, _ClassStats())
            s.clients += 1
            s.tiers.add(c.tier)
        self.round_seconds: list[float] = []

    @property
    def deadline_s(self) -> float | None:
        return self.policy.deadline_s

    def tier_of(self, client_id: int) -> str:
        return self.clients[client_id].tier

    def client_seconds(self, client_id: int, samples: int, bytes_moved: int, generator_phase: bool) -> float:
        client = self.clients[client_id]
        if generator_phase and self.generator_mflops is not None:
            ref = self.catalogue.cost(self.catalogue.reference_tier).train_mflops_per_sample
            compute = samples / (client.profile.train_samples_per_s * ref / self.generator_mflops)
            return compute + transfer_s(bytes_moved, client.profile.bandwidth_mbps)
        return estimate_round_s(self.catalogue, client.tier, client.profile.train_samples_per_s, samples,
                                bytes_moved, client.profile.bandwidth_mbps)

    def close_round(self, seconds: dict[int, float]) -> tuple[list[int], float]:
        """Stragglers of the round (past the deadline) and the round's simulated duration."""
        late = [c for c, s in seconds.items() if self.deadline_s is not None and s > self.deadline_s]
        for c, s in seconds.items():
            stats = self._stats[self.clients[c].profile.name]
            stats.seconds.append(s)
            stats.client_rounds += 1
            stats.stragglers += c in late
        on_time = [s for c, s in seconds.items() if c not in late]
        duration = self.deadline_s if late else max(on_time, default=0.0)
        self.round_seconds.append(float(duration))
        return late, float(duration)

    def clock_state(self) -> dict:
        """What the simulated clock has counted so far, as JSON for a checkpoint (the profiles and
        tiers are not in it: they follow from the config)."""
        return {"round_seconds": list(self.round_seconds),
                "classes": {name: {"seconds": list(s.seconds), "stragglers": s.stragglers,
                                   "client_rounds": s.client_rounds} for name, s in self._stats.items()}}

    def restore_clock(self, state: dict) -> None:
        """Go on counting from a checkpoint's `clock_state`; a device class the mix lacks is refused."""
        classes = state["classes"]
        if set(classes) != set(self._stats):
            raise GeflError(f"the checkpoint's device classes ({', '.join(sorted(classes))}) are not this device "
                            f"mix's ({', '.join(sorted(self._stats))}): was the devices file changed?")
        self.round_seconds = [float(s) for s in state["round_seconds"]]
        for name, saved in classes.items():
            stats = self._stats[name]
            stats.seconds = [float(s) for s in saved["seconds"]]
            stats.stragglers = int(saved["stragglers"])
            stats.client_rounds = int(saved["client_rounds"])

    def summary(self) -> dict:
        return {
            "deadline_s": self.deadline_s,
            "simulated_time_s": round(sum(self.round_seconds), 2),
            "device_classes": {
                name: {"clients": s.clients, "tiers": sorted(s.tiers),
                       "median_round_s": round(statistics.median(s.seconds), 2) if s.seconds else None,
                       "max_round_s": round(max(s.seconds), 2) if s.seconds else None,
                       "stragglers": s.stragglers, "client_rounds": s.client_rounds}
                for name, s in self._stats.items()
            },
        }


def format_device_summary(summary: dict) -> str:
    deadline = f"{summary['deadline_s']:g} s" if summary["deadline_s"] is not None else "none"
    rows = [f"simulated devices (deadline {deadline}, simulated time {summary['simulated_time_s']:.0f} s)",
            f"{'device':<18}{'clients':>8}  {'tiers':<20}{'median s':>9}{'max s':>8}{'stragglers':>12}"]
    for name, d in summary["device_classes"].items():
        rows.append(f"{name:<18}{d['clients']:>8}  {','.join(d['tiers']):<20}{d['median_round_s'] or 0:>9.1f}"
                    f"{d['max_round_s'] or 0:>8.1f}{d['stragglers']:>6}/{d['client_rounds']:<5}")
    return "\n".join(rows)


def simulated_devices(cfg: Config, dataset: Dataset, algorithm: Algorithm) -> DeviceSimulation | None:
    """The device mix `cfg.devices` names (None without one), with the generator's training cost
    measured when the algorithm trains one: what `gefl simulate --devices` runs its clock on, with
    in-process clients or over a network transport alike."""
    if cfg.devices is None:
        return None
    per_client = cfg.partition.samples_per_client or len(dataset.train) // max(cfg.num_clients, 1)
    devices = DeviceSimulation(cfg.devices, list(cfg.tiers), per_client * cfg.train.local_epochs)
    if isinstance(algorithm, GeneratorAlgorithm):
        generator = algorithm.new_generator(dataset.in_channels, dataset.num_classes)
        shape = algorithm.generator_shape(dataset.in_channels)
        devices.generator_mflops = training_mflops_per_sample(
            generator, lambda g, b: g.loss(torch.rand(b, *shape), torch.randint(0, dataset.num_classes, (b,))))
    return devices
