"""Which tier a device trains, and how long a round takes on a device we only simulate.

The policy is deliberately simple enough to explain in one sentence: the largest tier (by
parameters) whose training fits in a fraction of the available memory and whose estimated
round time meets the round deadline. Memory is a hard limit (a board that swaps or gets
OOM-killed helps nobody); the deadline is soft: a device too slow for every tier still gets
the fastest one and is told it will straggle, so it can contribute when the deadline allows.

Round time is estimated from the tier catalogue (configs/tiers.yaml, written by
benchmarks/tiers.py): a device's measured throughput on the reference tier is scaled by the
ratio of training FLOPs. The same arithmetic drives the simulated clock of
`gefl simulate --devices`, so what the policy promises is what the simulation charges.

Memory depends on which torch build the device runs, so the catalogue measures both: a device
with CUDA runs a CUDA build (which maps hundreds of MB of CUDA libraries before any model), one
without runs the CPU-only build (every Raspberry Pi: PyPI's aarch64 torch is CPU-only). Charging
a Pi the CUDA build's figures overstated its need by some 470 MB, nearly all a Pi Zero 2 W has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gefl.errors import GeflError, unknown_name
from gefl.resources import packaged, resolve

CATALOGUE_PATH = packaged("tiers.yaml")
DEVICES_PATH = packaged("devices.yaml")
MEMORY_FRACTION = 0.8
"""Share of the available memory (MemAvailable: what the kernel, the OS and other processes leave)
the training client may take. The rest is headroom for the page cache and for what the estimate
(torch, gefl and the tier's training) leaves out of a whole client: about 60 MB with fedavg and 120 MB
in a gefl-f generator round (benchmarks/results/client_memory.md). 0.8 lets a 512 MB Pi Zero 2 W
(380 MB available) train on the CPU build, whose whole cnn3c client peaks at 288-349 MB."""


@dataclass(frozen=True)
class TierCost:
    name: str
    params: int
    train_mflops_per_sample: float
    train_memory_mb: float
    """What training adds on top of the runtime, with the CUDA build of torch."""
    opt_in: bool = False
    train_samples_per_s: float | None = None
    """Measured on the catalogue's machine; ratios of these predict speed better than FLOPs, since
    small tiers are bound by per-layer overhead rather than arithmetic."""
    train_memory_mb_cpu: float | None = None
    """The same with the CPU-only build; None where it could not be measured (the torchvision tiers: the
    CPU venv has no torchvision), and then train_memory_mb stands in: what a tier adds (tensors,
    gradients, optimizer state) is the same in both builds to within a few tenths of a MB."""

    def memory_mb(self, cuda: bool) -> float:
        return self.train_memory_mb if cuda or self.train_memory_mb_cpu is None else self.train_memory_mb_cpu


@dataclass(frozen=True)
class Catalogue:
    reference_tier: str
    runtime_memory_mb: float
    """Memory of a process with the CUDA build of torch loaded, before any model: every tier pays it."""
    tiers: dict[str, TierCost]
    runtime_memory_mb_cpu: float | None = None
    """The same with the CPU-only build (None: unknown, and the CUDA figure, the larger, stands in)."""

    def cost(self, tier: str) -> TierCost:
        if tier not in self.tiers:
            raise GeflError(f"tier {tier!r} is not in the tier catalogue ({', '.join(self.tiers)}); measure it with "
                            "`python benchmarks/tiers.py`, which rewrites configs/tiers.yaml")
        return self.tiers[tier]

    def samples_per_s(self, tier: str, reference_samples_per_s: float) -> float:
        """Training throughput of `tier` on a device that trains the reference tier this fast: scaled by
        the measured speed ratio where the catalogue has one, by the FLOPs ratio otherwise."""
        ref, cost = self.cost(self.reference_tier), self.cost(tier)
        if ref.train_samples_per_s and cost.train_samples_per_s:
            return reference_samples_per_s * cost.train_samples_per_s / ref.train_samples_per_s
        return reference_samples_per_s * ref.train_mflops_per_sample / cost.train_mflops_per_sample

    def runtime_mb(self, cuda: bool) -> float:
        if cuda or self.runtime_memory_mb_cpu is None:
            return self.runtime_memory_mb
        return self.runtime_memory_mb_cpu

    def memory_mb(self, tier: str, cuda: bool) -> float:
        """What training `tier` takes on a device with (`cuda`) or without CUDA: a device with CUDA runs
        the CUDA build of torch, one without the CPU-only build, and the two builds' runtimes differ by
        hundreds of MB."""
        return self.runtime_mb(cuda) + self.cost(tier).memory_mb(cuda)


def build_name(cuda: bool) -> str:
    """How the reasons name the figures used, so a refusal says which torch it assumed."""
    return "CUDA build of torch" if cuda else "CPU-only build of torch"


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise GeflError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise GeflError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise GeflError(f"{what} {path} must be a mapping at the top level")
    return data


_REGENERATE = ("regenerate it with `python benchmarks/tiers.py --python CPU-VENV/bin/python`, where CPU-VENV is a "
               "virtualenv with the CPU-only torch (pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def load_catalogue(path: str | Path = CATALOGUE_PATH) -> Catalogue:
    data = _read_yaml(Path(path), "tier catalogue")
    # An explicit check: a catalogue from before the CPU-build columns would otherwise fail as a bare KeyError.
    missing = [key for key in ("runtime_memory_mb", "runtime_memory_mb_cpu") if key not in data]
    rows = data.get("tiers")
    if isinstance(rows, dict):
        missing += [f"{name}.train_memory_mb_cpu" for name, row in rows.items()
                    if isinstance(row, dict) and "train_memory_mb_cpu" not in row]
    if missing:
        raise GeflError(f"tier catalogue {path} lacks {', '.join(missing)} (the CPU-only torch build's memory "
                        f"figures, which boards without CUDA are charged); {_REGENERATE}")
    try:
        tiers = {
            name: TierCost(name, int(row["params"]), float(row["train_mflops_per_sample"]),
                           float(row["train_memory_mb"]), bool(row.get("opt_in", False)),
                           float(row["train_samples_per_s"]) if row.get("train_samples_per_s") else None,
                           None if row["train_memory_mb_cpu"] is None else float(row["train_memory_mb_cpu"]))
            for name, row in data["tiers"].items()
        }
        catalogue = Catalogue(str(data["reference_tier"]), float(data["runtime_memory_mb"]), tiers,
                              float(data["runtime_memory_mb_cpu"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GeflError(f"tier catalogue {path} is malformed ({type(exc).__name__}: {exc}); {_REGENERATE}") from None
    catalogue.cost(catalogue.reference_tier)
    return catalogue


@dataclass(frozen=True)
class DeviceProfile:
    """What the policy and the simulated clock need to know about a device."""

    name: str
    memory_available_mb: float
    train_samples_per_s: float
    """Training throughput of the catalogue's reference tier (what `gefl probe` measures)."""
    bandwidth_mbps: float = 100.0
    cores: int = 1
    memory_total_mb: float | None = None
    cuda: bool = False
    """Whether it trains with a CUDA build of torch; the policy charges it that build's memory figures."""
    expected_tier: str | None = None
    """The tier the policy should pick under the devices file's policy section (checked by the tests)."""

    @classmethod
    def from_probe(cls, report: dict, name: str = "this device") -> DeviceProfile:
        """The profile of a device that `gefl probe` measured (edge_client.probe.ProbeReport.to_dict():
        bytes, a CUDA description or None), as the policy reads it (MB, a CUDA build or not): the one
        place that converts, for `gefl probe` on the board and `--tier auto` on the aggregator."""
        memory = report.get("memory_available_bytes")
        speed = report.get("train_samples_per_s")
        if not memory or not speed:
            raise GeflError("tier 'auto' needs the device's measured profile (memory and training speed); run the "
                            "client with --tier auto on the device itself, or name a tier with --tier")
        total = report.get("memory_total_bytes")
        return cls(name, memory / 2**20, float(speed), cores=int(report.get("cpu_count") or 1),
                   memory_total_mb=total / 2**20 if total else None, cuda=bool(report.get("cuda")))


@dataclass(frozen=True)
class Policy:
    deadline_s: float | None = None
    samples_per_round: int = 3000
    """Local training samples per round: samples per client x local epochs (the paper: 600 x 5)."""
    memory_fraction: float = MEMORY_FRACTION

    def __post_init__(self) -> None:
        """Checked here so a devices file and the probe's flags fail the same way."""
        if self.deadline_s is not None and (not isinstance(self.deadline_s, int | float) or self.deadline_s <= 0):
            raise GeflError(f"policy deadline_s must be a positive number of seconds, got {self.deadline_s!r}")
        if not isinstance(self.samples_per_round, int) or self.samples_per_round < 1:
            raise GeflError(f"policy samples_per_round must be a positive whole number, got {self.samples_per_round!r}")
        if not isinstance(self.memory_fraction, int | float) or not 0 < self.memory_fraction <= 1:
            raise GeflError(f"policy memory_fraction must be in (0, 1], got {self.memory_fraction!r}")


_PROFILE_KEYS = {"memory_available_mb", "train_samples_per_s", "bandwidth_mbps", "cores", "memory_total_mb", "cuda",
                 "expected_tier"}


def parse_profiles(data: Any, source: str) -> dict[str, DeviceProfile]:
    if not isinstance(data, dict):
        raise GeflError(f"{source}: 'profiles' must map profile names to their figures")
    profiles = {}
    for name, row in data.items():
        if not isinstance(row, dict):
            raise GeflError(f"{source}: profile {name!r} must be a mapping")
        unknown = set(row) - _PROFILE_KEYS
        if unknown:
            raise GeflError(f"{source}: profile {name!r} has unknown keys {sorted(unknown)}; valid keys are "
                            f"{', '.join(sorted(_PROFILE_KEYS))}")
        for key in ("memory_available_mb", "train_samples_per_s"):
            if key not in row:
                raise GeflError(f"{source}: profile {name!r} lacks {key!r}")
            if not isinstance(row[key], int | float) or row[key] <= 0:
                raise GeflError(f"{source}: profile {name!r}: {key} must be a positive number, got {row[key]!r}")
        profiles[str(name)] = DeviceProfile(name=str(name), **row)
    return profiles


def parse_policy(data: Any, source: str) -> Policy:
    if data is None:
        return Policy()
    if not isinstance(data, dict) or set(data) - {"deadline_s", "samples_per_round", "memory_fraction"}:
        raise GeflError(f"{source}: 'policy' may hold deadline_s, samples_per_round and memory_fraction only")
    return Policy(**data)


def load_profiles(path: str | Path = DEVICES_PATH) -> tuple[dict[str, DeviceProfile], Policy]:
    data = _read_yaml(Path(path), "devices file")
    return parse_profiles(data.get("profiles", {}), str(path)), parse_policy(data.get("policy"), str(path))


@dataclass(frozen=True)
class Choice:
    tier: str
    reason: str
    round_time_s: float
    memory_mb: float
    meets_deadline: bool


def transfer_s(transfer_bytes: int, bandwidth_mbps: float | None) -> float:
    return 8 * transfer_bytes / (bandwidth_mbps * 1e6) if bandwidth_mbps and transfer_bytes else 0.0


def estimate_round_s(catalogue: Catalogue, tier: str, reference_samples_per_s: float, samples: int,
                     transfer_bytes: int = 0, bandwidth_mbps: float | None = None) -> float:
    """Local training time plus the time to download and upload the exchanged weights."""
    compute = samples / catalogue.samples_per_s(tier, reference_samples_per_s)
    return compute + transfer_s(transfer_bytes, bandwidth_mbps)


def select_tier(
    candidates: list[str],
    memory_available_mb: float,
    reference_samples_per_s: float,
    policy: Policy,
    catalogue: Catalogue,
    bandwidth_mbps: float | None = None,
    *,
    cuda: bool,
) -> Choice:
    """The largest candidate that fits in memory and meets the deadline, with the reason why.

    `cuda` (the device has CUDA, so runs a CUDA build of torch) picks the catalogue's memory figures;
    it has no default because guessing wrong either refuses a board every tier or overcommits it.
    """
    if not candidates:
        raise GeflError("no candidate tiers to choose from")
    budget = policy.memory_fraction * memory_available_mb
    by_size = sorted(candidates, key=lambda t: -catalogue.cost(t).params)
    fitting, rejected = [], []
    for tier in by_size:
        need = catalogue.memory_mb(tier, cuda)
        # Weights travel both ways as float32 every round.
        seconds = estimate_round_s(catalogue, tier, reference_samples_per_s, policy.samples_per_round,
                                   2 * 4 * catalogue.cost(tier).params, bandwidth_mbps)
        if need > budget:
            rejected.append((tier, f"{tier} would need {need:,.0f} MB > {budget:,.0f} MB "
                                   f"({100 * policy.memory_fraction:.0f}% of {memory_available_mb:,.0f} MB available)"))
            continue
        fitting.append((tier, need, seconds))
        if policy.deadline_s is None or seconds <= policy.deadline_s:
            return Choice(tier, _explain(tier, need, budget, seconds, policy, rejected, cuda), seconds, need, True)
        rejected.append((tier, f"{tier} would need {seconds:.1f} s > {policy.deadline_s:g} s deadline"))
    if not fitting:
        smallest = min(candidates, key=lambda t: catalogue.memory_mb(t, cuda))
        raise GeflError(f"no tier fits this device's memory: the smallest, {smallest}, would need "
                        f"{catalogue.memory_mb(smallest, cuda):,.0f} MB but training may use {budget:,.0f} MB "
                        f"({100 * policy.memory_fraction:.0f}% of {memory_available_mb:,.0f} MB available; "
                        f"figures for the {build_name(cuda)})")
    tier, need, seconds = min(fitting, key=lambda f: f[2])
    reason = (f"no tier meets the {policy.deadline_s:g} s deadline; {tier} is the fastest that fits in memory "
              f"(about {seconds:.1f} s per round): expect this device to straggle")
    return Choice(tier, reason, seconds, need, False)


def _explain(tier: str, need: float, budget: float, seconds: float, policy: Policy,
             rejected: list[tuple[str, str]], cuda: bool) -> str:
    deadline = f"within the {policy.deadline_s:g} s deadline" if policy.deadline_s is not None else "no deadline"
    text = (f"{tier}: needs {need:,.0f} MB of {budget:,.0f} MB allowed ({build_name(cuda)}), "
            f"about {seconds:.1f} s per round ({deadline})")
    if rejected:
        text += f"; {rejected[-1][1]}"
    return text


def parse_mix(data: Any, profiles: dict[str, DeviceProfile], source: str) -> list[str]:
    """{profile: count} (or a "3 x rpi-4, 2 x desktop-gpu" string) -> one profile name per client."""
    if isinstance(data, str):
        pairs = []
        for part in filter(None, (p.strip() for p in data.split(","))):
            count, sep, name = part.partition("x")
            if not sep or not count.strip().isdigit():
                raise GeflError(f"{source}: cannot read {part!r} in the mix; write it as '3 x rpi-4'")
            pairs.append((name.strip(), int(count)))
        data = dict(pairs)
    if not isinstance(data, dict) or not data:
        raise GeflError(f"{source}: 'mix' must name profiles and counts, e.g. {{rpi-4: 3, desktop-gpu: 1}}")
    clients = []
    for name, count in data.items():
        if name not in profiles:
            raise unknown_name("device profile", name, profiles)
        if not isinstance(count, int) or count < 1:
            raise GeflError(f"{source}: the mix needs a positive whole count for {name!r}, got {count!r}")
        clients += [name] * count
    return clients


def load_mix(path: str | Path) -> tuple[list[DeviceProfile], Policy]:
    """A devices file for `gefl simulate --devices`: a `mix`, plus optional `profiles` and `policy`
    that extend or override configs/devices.yaml."""
    profiles, policy = load_profiles(DEVICES_PATH)
    path = resolve(path, "devices file")
    data = _read_yaml(path, "devices file")
    unknown = set(data) - {"profiles", "policy", "mix"}
    if unknown:
        raise GeflError(f"devices file {path}: unknown keys {sorted(unknown)}; valid keys are mix, profiles, policy")
    profiles.update(parse_profiles(data.get("profiles", {}), str(path)))
    if "policy" in data:
        policy = parse_policy(data["policy"], str(path))
    if "mix" not in data:
        raise GeflError(f"devices file {path} has no 'mix' (which profiles, how many), e.g. mix: {{rpi-4: 3}}")
    return [profiles[name] for name in parse_mix(data["mix"], profiles, str(path))], policy
