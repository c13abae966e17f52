"""A whole federation on one machine: the one round loop (gefl.rounds.loop) with in-process clients.

The clients are worker processes of this machine (gefl.simulation.executor), reached through `PoolGrid`,
the in-process counterpart of the aggregator's coordinator: the round loop, the checkpoints,
the device clock and the metrics are those an aggregator runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from gefl.algorithms import ClientTask, make_algorithm
from gefl.config import Config, config_from_dict, load_config
from gefl.data import Dataset, Split, client_indices, evaluation_split, few_steps_warning, label_histogram, load_dataset
from gefl.errors import GeflError
from gefl.rounds.checkpoint import CHECKPOINT
from gefl.rounds.loop import Accept, Delivery, RoundLoop, RoundPlan, observers_for
from gefl.rounds.rundir import RunDir
from gefl.rounds.training_logic import TrainingLogic, format_summary
from gefl.simulation.device_sim import format_device_summary, simulated_devices
from gefl.simulation.executor import Executor, WorkerContext, default_workers, make_executor

log = logging.getLogger(__name__)



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GeflError("device 'cuda' was asked for but torch sees no CUDA device; use --set device=cpu")
    return torch.device(name)


def _as_config(config: Config | dict | str | Path | None) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def simulate(
    config: Config | dict | str | Path | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
) -> dict:
    """Run a federation in-process and return its summary (also written to the run directory).

    `config` is a Config, a dict of config keys, a YAML path, or None for the defaults. The run
    checkpoints after every round; `resume=RUN_DIR` goes on from a stopped run's last checkpoint
    and ends with the results an uninterrupted run has. Without `config` it resumes the run's own
    config.yaml; with one, a key that differs is refused by name.
    """
    if resume is not None:
        if out is not None:
            raise GeflError("--resume goes on in the run directory it names; give no --out with it")
        if not (Path(resume) / CHECKPOINT).is_file():
            raise GeflError(f"{resume} holds no {CHECKPOINT}: it is not a run directory, or the run stopped before "
                            "its first round closed; start it afresh")
        if config is None:
            config = Path(resume) / "config.yaml"
    cfg = _as_config(config)
    # Ray actors move the data to the device `ray.gpus` gives them; the driver need have none.
    device = resolve_device(cfg.device) if cfg.executor == "local" else torch.device("cpu")
    if resume is None:
        RunDir.check_target(out)
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    algorithm = make_algorithm(cfg)
    devices = simulated_devices(cfg, dataset, algorithm)
    if devices is not None:
        cfg = dataclasses.replace(cfg, num_clients=len(devices.clients))
    tier_of = devices.tier_of if devices is not None else cfg.tier_of
    clients = _split_clients(cfg, dataset, device)
    scored = evaluation_split(cfg, dataset)
    test = Split(scored.images.to(device), scored.labels.to(device))
    tiers = list(dict.fromkeys(tier_of(c) for c in range(cfg.num_clients)))
    run = RunDir.create(out, cfg) if resume is None else RunDir.resume_or_create(resume, cfg)
    partition = [
        {"client": c, "tier": tier_of(c), "num_samples": len(split),
         **({"device": devices.clients[c].profile.name, "tier_reason": devices.clients[c].reason} if devices else {}),
         "label_histogram": label_histogram(split.labels.cpu().numpy(), dataset.num_classes)}
        for c, split in clients.items()
    ]
    ctx = WorkerContext(algorithm, clients, test, dataset.num_classes, cfg.eval.batch_size)
    executor: Executor
    if cfg.executor == "ray":
        from gefl.simulation.ray_executor import RayExecutor  # the optional `ray` extra

        executor = RayExecutor(ctx, cfg.ray, cfg.workers, cfg.num_clients)
        where = f"{executor.workers} Ray actor(s) on {executor.device}"
    else:
        executor = make_executor(ctx, cfg.workers or default_workers(cfg.num_clients), device)
        where = f"{executor.workers} worker(s) on {device.type}"
    try:
        logic = TrainingLogic(cfg, dataset, run, tiers=tiers, used=tiers, evaluator=executor, algorithm=algorithm,
                              extras=(lambda: {"devices": devices.summary()}) if devices is not None else None)
        loop = RoundLoop(logic, PoolGrid(executor, tier_of, partition), num_clients=cfg.num_clients,
                         client_fraction=cfg.client_fraction, seed=cfg.seed, eval_every=cfg.eval.every,
                         checkpoint_path=run.path / CHECKPOINT, devices=devices, train_epochs=cfg.train.local_epochs,
                         generator_epochs=cfg.gefl.generator.local_epochs, observers=observers_for(cfg))
        if resume is not None and not loop.federation.completed:
            raise GeflError(f"{resume}'s checkpoint has no round closed yet; start the run afresh")
        run.write_json("partition.json", partition)
        log.info(f"gefl simulate: {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} clients, "
            f"{loop.federation.total_rounds} rounds ({', '.join(f'{ph.name} {ph.rounds}' for ph in logic.phases())}), "
            f"{where} -> {run.path}")
        sizes = [len(clients[c]) for c in range(cfg.num_clients)]
        if devices is not None:
            classes = devices.summary()["device_classes"]
            log.info(f"devices: {cfg.devices}: " + "; ".join(
                f"{name} x{d['clients']} -> {', '.join(d['tiers'])}" for name, d in classes.items()))
        log.info(f"data: {cfg.partition.kind} partition, {sum(sizes)} images, {min(sizes)}-{max(sizes)} per client; "
            f"label histograms in {run.path / 'partition.json'}")
        if (warning := few_steps_warning(sizes, cfg.train.batch_size)) is not None:
            log.warning(warning)
        loop.run()
    finally:
        executor.close()
    summary = json.loads((run.path / "summary.json").read_text())
    if devices is not None:
        log.info(format_device_summary(summary["devices"]))
    return summary


class PoolGrid:
    """The way to in-process clients: every client is always there, and a round's tasks run on the
    executor's worker processes (largest tier first, so a small one finishes the round)."""

    retries = False

    def __init__(self, executor: Executor, tier_of: Callable[[int], str], partition: list[dict]) -> None:
        self.executor = executor
        self._tier_of = tier_of
        self._partition = partition

    def wait_for_clients(self, quorum: int) -> list[int]:
        return [c["client"] for c in self._partition]

    def tier_of(self, client_id: int) -> str:
        return self._tier_of(client_id)

    def send_and_receive(self, plan: RoundPlan, accept: Accept) -> Delivery:
        info = plan.info
        tasks = [ClientTask.from_artifacts(info.number, info.phase, c, plan.tiers[c], plan.seeds[c],
                                           plan.artifacts[plan.tiers[c]]) for c in info.participants]
        tasks.sort(key=lambda t: -sum(len(b) for b in plan.artifacts[t.tier].values()))
        delivery = Delivery()
        for result in self.executor.run(tasks):
            try:
                delivery.results[result.client_id] = accept(result)
            except GeflError as exc:
                delivery.refused[result.client_id] = str(exc)
                log.warning(f"round {info.number}: update of client {result.client_id} refused, the global state is "
                         f"unchanged by it: {exc}")
                continue
            delivery.upload_bytes[result.client_id] = len(result.state)
        return delivery

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def closed(self, record: dict) -> None:
        pass

    def roster(self) -> list[dict]:
        return self._partition

    def finish(self) -> None:
        pass


def _split_clients(cfg: Config, dataset: Dataset, device: torch.device) -> dict[int, Split]:
    """Each client's share of the training set, by the configured partition and seed."""
    parts = client_indices(cfg, dataset.train.labels.numpy())
    clients = {c: dataset.train.subset(idx) for c, idx in enumerate(parts)}
    if device.type != "cpu":
        clients = {c: Split(s.images.to(device), s.labels.to(device)) for c, s in clients.items()}
    return clients


__all__ = ["PoolGrid", "format_summary", "resolve_device", "simulate"]
