"""The run configuration's shape: nested dataclasses and their defaults, nothing else.

Everything that reads a config only to use it (algorithms, training, data partitions) imports
these from here; reading one from YAML and checking names against the registries is
gefl.config's, which sits above those modules (it asks them which names exist). gefl.config
re-exports every class, so `from gefl.config import Config` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gefl.tiers.models import PAPER_TIERS


@dataclass
class PartitionConfig:
    kind: str = "iid"
    """iid | dirichlet | shards"""
    samples_per_client: int | None = 600
    """Images per client drawn from the training set (the paper: 600); null = the whole set."""
    alpha: float = 0.3
    shards_per_client: int = 2


@dataclass
class TrainConfig:
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    local_epochs: int = 5
    prox_mu: float = 0.01
    """FedProx's mu; the other algorithms ignore it."""


@dataclass
class GeneratorConfig:
    family: str = "cvae-f"
    """A registered family (`gefl list`): feature-level (-f) for gefl-f, image-level for gefl."""
    preset: str | None = "small"
    options: dict[str, Any] = field(default_factory=dict)
    """Family-specific overrides of the preset, for example {widths: [16, 32, 64], latent: 8}."""
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's betas (DCGAN trains with [0.5, 0.999])."""
    local_epochs: int = 5
    batch_size: int | None = None
    """Batch size of the generator's local steps; null = train.batch_size. A small generator on a
    CPU core takes a batch of 32 in about 0.63 of the time of one of 64, so halving it gives twice
    the optimisation steps per epoch for about 1.3 times the time."""
    wire_dtype: str = "float16"
    """How generator weights travel, both ways: float16 halves the bytes; the aggregator averages
    and keeps them in float32."""


@dataclass
class GeflConfig:
    """The generator-based algorithms' schedule (gefl-f: warm-up, generator, head; gefl: generator, train)."""

    warmup_rounds: int = 20
    generator_rounds: int = 100
    generated_passes: int = 1
    """Passes over generated data before the local epochs on real data, per round (each pass as
    many batches as the client's data)."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class FedDFConfig:
    """FedDF's server-side distillation (the other algorithms ignore it)."""

    public_dataset: str | None = None
    """Where the unlabelled public images come from: null = the federation's own dataset, from the
    training images its partition gives to no client; or another dataset's training images."""
    public_size: int = 5000
    steps: int = 100
    """Adam steps per architecture per round, one batch of public images each."""
    lr: float = 1e-3
    temperature: float = 1.0


@dataclass
class AggregationConfig:
    weighted: bool = True
    """Weight client updates by their sample counts; the paper averages unweighted."""


@dataclass
class EvalConfig:
    every: int = 10
    """Evaluate at round 1 of each training phase, every k-th round, and the phase's last."""
    batch_size: int = 1000
    split: str = "test"
    """What the accuracies are measured on: "test", the dataset's test set (the figures a run
    reports), or "validation", `validation_size` training images that no client holds, for
    choosing designs and hyper-parameters without looking at the test set."""
    validation_size: int = 10000


@dataclass
class NetworkConfig:
    """How a networked aggregator (`gefl aggregator serve`) runs rounds; the simulator ignores it."""

    min_clients: int | None = None
    """The quorum: the first round starts once this many clients are registered, and a round counts
    only with this many results (fewer by the deadline: the round runs again). null = num_clients."""
    round_timeout: float = 600.0
    """Seconds a round waits for results; a client that is slower is left out of that round."""
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 20.0
    """A client silent this long (no heartbeat, no call) is counted offline and not waited for.
    Generous, because a slow board under load must never be taken for a dead one; a dead one is
    noticed at once anyway, when its connection closes (gRPC stream, MQTT last will)."""


@dataclass
class RayConfig:
    """Where `executor: ray` runs a simulation's clients (the `ray` extra)."""

    address: str = ""
    """"": start a Ray instance on this machine for the run, stopped after it; "auto": join the
    cluster this machine is part of (`ray start`); "HOST:PORT": join the cluster whose head is there."""
    cpus: float = 1.0
    """CPUs each client actor holds (and its PyTorch threads, at least one): 1 gives the local
    pool's results bit for bit, since the thread count changes the order of floating-point sums."""
    gpus: float = 0.0
    """GPUs each client actor holds; above 0 it trains on CUDA (a fraction shares one GPU)."""


@dataclass
class Config:
    name: str = "run"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    seed: int = 0
    algorithm: str = "gefl-f"
    """fedavg | fedprox | lg-fedavg | avgkd | feddf | gefl | gefl-f"""
    num_clients: int = 10
    tiers: list[str] = field(default_factory=lambda: list(PAPER_TIERS))
    """Client i trains tiers[i % len(tiers)]."""
    client_fraction: float = 1.0
    rounds: int = 50
    """Classifier rounds: all rounds for the baselines, head rounds (after warm-up) for gefl-f."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gefl: GeflConfig = field(default_factory=GeflConfig)
    feddf: FedDFConfig = field(default_factory=FedDFConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    executor: str = "local"
    """Where simulated clients train: "local", worker processes of this machine; "ray", actors on a
    Ray cluster (`ray.*`)."""
    ray: RayConfig = field(default_factory=RayConfig)
    workers: int | None = None
    """Clients training in parallel (worker processes, or Ray actors); null = one per CPU core of the
    machine, or of the Ray cluster (by `ray.cpus` and `ray.gpus`), capped by the clients."""
    device: str = "auto"
    """auto | cpu | cuda"""

    devices: str | None = None
    """A devices file (configs/devices.yaml): each client gets a device profile from its mix, picks its
    tier by the device policy, and the run keeps a simulated clock with deadlines and stragglers."""

    tensorboard: str | None = None
    """A directory for TensorBoard scalars per round (accuracy, loss, bytes, simulated time); needs the
    tensorboard extra."""

    def tier_of(self, client_id: int) -> str:
        return self.tiers[client_id % len(self.tiers)]
