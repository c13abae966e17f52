"""A whole federation on one machine: the in-process driver of the federation state machine.

The loop is the one an aggregator runs, minus the network: open a round, hand each participant
its task, submit the results, close the round, aggregate, evaluate when the schedule says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gefl import checkpoint
from gefl.algorithms import (
    GENERATOR,
    Algorithm,
    ClientResult,
    ClientTask,
    GeneratorAlgorithm,
    GlobalState,
    make_algorithm,
)
from gefl.checkpoint import CHECKPOINT, restore_global_state, state_arrays
from gefl.config import Config, config_from_dict, load_config
from gefl.data import Dataset, Split, client_indices, label_histogram, load_dataset
from gefl.device_sim import DeviceSimulation, format_device_summary, training_mflops_per_sample
from gefl.errors import GeflError
from gefl.executor import WorkerContext, default_workers, make_executor
from gefl.federation import Federation, RoundInfo, round_traffic, task_seed
from gefl.models import count_parameters, get_model
from gefl.rundir import RunDir
from gefl.scoreboard import Scoreboard, format_accuracy
from gefl.wire import encode_state

Progress = Callable[[str], None]


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
    progress: Progress | None = print,
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
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    if resume is None:
        RunDir.check_target(out)
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    devices = _device_simulation(cfg, len(dataset.train))
    if devices is not None:
        cfg = dataclasses.replace(cfg, num_clients=len(devices.clients))
    tier_of = devices.tier_of if devices is not None else cfg.tier_of
    clients = _split_clients(cfg, dataset, device)
    test = Split(dataset.test.images.to(device), dataset.test.labels.to(device))
    tiers = list(dict.fromkeys(tier_of(c) for c in range(cfg.num_clients)))
    algorithm = make_algorithm(cfg)
    if devices is not None and isinstance(algorithm, GeneratorAlgorithm):
        generator = algorithm.new_generator(dataset.in_channels, dataset.num_classes)
        shape = algorithm.generator_shape(dataset.in_channels)
        devices.generator_mflops = training_mflops_per_sample(
            generator, lambda g, b: g.loss(torch.rand(b, *shape), torch.randint(0, dataset.num_classes, (b,))))
    federation: Federation[ClientResult] = Federation(
        algorithm.phases(), cfg.num_clients, cfg.client_fraction, cfg.seed, cfg.eval.every
    )
    state = algorithm.init_state(tiers, dataset.in_channels, dataset.num_classes)
    params = {t: count_parameters(get_model(t, dataset.in_channels, dataset.num_classes)) for t in tiers}

    scores = Scoreboard(tiers)
    if resume is None:
        run = RunDir.create(out, cfg)
        elapsed_before = 0.0
    else:
        run = RunDir.resume_or_create(resume, cfg)
        state, scores, elapsed_before = _restore(run.path / CHECKPOINT, algorithm, state, federation, devices,
                                                 dataset)
        run.truncate_metrics(federation.completed)
        say(f"resuming {run.path} after round {federation.completed} of {federation.total_rounds}")
    run.write_json("partition.json", [
        {"client": c, "tier": tier_of(c), "num_samples": len(split),
         **({"device": devices.clients[c].profile.name, "tier_reason": devices.clients[c].reason} if devices else {}),
         "label_histogram": label_histogram(split.labels.cpu().numpy(), dataset.num_classes)}
        for c, split in clients.items()
    ])
    workers = cfg.workers or default_workers(cfg.num_clients)
    say(
        f"gefl simulate: {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} clients, "
        f"{federation.total_rounds} rounds ({', '.join(f'{ph.name} {ph.rounds}' for ph in algorithm.phases())}), "
        f"{workers} worker(s) on {device.type} -> {run.path}"
    )
    sizes = [len(clients[c]) for c in range(cfg.num_clients)]
    if devices is not None:
        classes = devices.summary()["device_classes"]
        say(f"devices: {cfg.devices}: " + "; ".join(
            f"{name} x{d['clients']} -> {', '.join(d['tiers'])}" for name, d in classes.items()))
    say(f"data: {cfg.partition.kind} partition, {sum(sizes)} images, {min(sizes)}-{max(sizes)} per client; "
        f"label histograms in {run.path / 'partition.json'}")

    executor = make_executor(WorkerContext(algorithm, clients, test, dataset.num_classes, cfg.eval.batch_size),
                             workers, device)
    resumed_at = federation.completed
    try:
        while not federation.finished:
            info = federation.open_round()
            t0 = time.perf_counter()
            state = algorithm.prepare_round(info.phase, state, dataset.num_classes)
            tasks, downloads = _tasks(cfg, algorithm, info, state, params, tier_of)
            received = list(executor.run(tasks))
            late: list[int] = []
            record: dict = {"round": info.number, "phase": info.phase, "phase_round": info.phase_round,
                            "participants": list(info.participants)}
            if devices is not None:
                late, record["simulated_s"] = _simulated_clock(devices, cfg, tasks, received, info.phase)
                record["stragglers"] = late
            for result in received:
                if result.client_id in late:
                    continue
                try:
                    algorithm.check_result(result, state)
                except GeflError as exc:
                    say(f"round {info.number}: update refused, the global state is unchanged by it: {exc}")
                    continue
                federation.submit(result.client_id, info.number, result)
            line = f"[{info.phase:>9} {info.phase_round:>3}/{info.phase_rounds:<3}] round {info.number:>3}/" \
                   f"{federation.total_rounds}"
            if late and len(late) == len(info.participants):
                federation.skip_round()
                line += "  every participant missed the deadline: no update this round"
            else:
                if len(federation.missing) == len(info.participants):
                    raise GeflError(f"round {info.number}: every client's update was refused (see above); "
                                    f"if training diverged, lower train.lr (now {cfg.train.lr})")
                results = list(federation.close_round().values())
                record["bytes"] = round_traffic(
                    downloads,
                    [{"generator" if info.phase == GENERATOR else "model": len(r.state)} for r in results])
                scores.add_traffic(info.phase, record["bytes"])
                state = algorithm.aggregate(info.phase, state, results)
                record["loss"] = float(np.mean([r.loss for r in results]))
                line += f"  loss {record['loss']:.4f}"
            if devices is not None:
                line += f"  simulated {record['simulated_s']:.1f}s" + (f", {len(late)} late" if late else "")
            if info.evaluate:
                record.update(scores.record(info.number, executor.evaluate(
                    {t: encode_state(state.models[t]) for t in tiers})))
                line += format_accuracy(record)
            record["seconds"] = time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            done_here = info.number - resumed_at
            eta = elapsed / done_here * (federation.total_rounds - info.number)
            say(f"{line}  {record['seconds']:.1f}s  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
            run.append_metrics(record)
            checkpoint.save(run.path / CHECKPOINT, state_arrays(state.models, state.generator), {
                "completed": federation.completed, "scores": scores.to_dict(),
                "elapsed_s": elapsed_before + time.perf_counter() - started,
                "clock": devices.clock_state() if devices is not None else None})
    finally:
        executor.close()

    wall = elapsed_before + time.perf_counter() - started
    summary = scores.summary(cfg, federation.total_rounds, wall, params, str(run.path))
    if devices is not None:
        summary["devices"] = devices.summary()
    run.save_weights(state, dataset, cfg)
    run.write_json("summary.json", summary)
    say(format_summary(summary))
    if devices is not None:
        say(format_device_summary(summary["devices"]))
    return summary


def _restore(path: Path, algorithm: Algorithm, template: GlobalState, federation: Federation,
             devices: DeviceSimulation | None, dataset: Dataset) -> tuple[GlobalState, Scoreboard, float]:
    """Load a stopped run's checkpoint into this run's federation and device clock; returns the
    global state, the scoreboard and the wall time the run had spent before."""
    arrays, meta = checkpoint.load(path)
    state = restore_global_state(arrays, algorithm, template, dataset.in_channels, dataset.num_classes)
    try:
        completed = int(meta["completed"])
        if not 0 < completed <= federation.total_rounds:
            raise ValueError(f"{completed} rounds completed, of {federation.total_rounds}")
        saved = Scoreboard.from_dict(meta["scores"])
        if devices is not None:
            devices.restore_clock(meta["clock"])
        elapsed = float(meta["elapsed_s"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GeflError(f"the checkpoint {path} is malformed ({type(exc).__name__}: {exc}); move it away and start "
                        "the run afresh") from None
    federation.completed = completed
    return state, saved, elapsed


def _split_clients(cfg: Config, dataset: Dataset, device: torch.device) -> dict[int, Split]:
    """Each client's share of the training set, by the configured partition and seed."""
    parts = client_indices(cfg, dataset.train.labels.numpy())
    clients = {c: dataset.train.subset(idx) for c, idx in enumerate(parts)}
    if device.type != "cpu":
        clients = {c: Split(s.images.to(device), s.labels.to(device)) for c, s in clients.items()}
    return clients


def _device_simulation(cfg: Config, train_size: int) -> DeviceSimulation | None:
    if cfg.devices is None:
        return None
    per_client = cfg.partition.samples_per_client or train_size // max(cfg.num_clients, 1)
    return DeviceSimulation(cfg.devices, list(cfg.tiers), per_client * cfg.train.local_epochs)


def _simulated_clock(devices: DeviceSimulation, cfg: Config, tasks: list[ClientTask], results: list[ClientResult],
                     phase: str) -> tuple[list[int], float]:
    """Each result's simulated arrival: local training plus the bytes it moved, at its device's speed."""
    sent = {t.client_id: len(t.model) + len(t.generator or b"") + len(t.teachers or b"") for t in tasks}
    generator_phase = phase == GENERATOR
    epochs = cfg.gefl.generator.local_epochs if generator_phase else cfg.train.local_epochs
    seconds = {r.client_id: devices.client_seconds(r.client_id, r.num_samples * epochs,
                                                   sent[r.client_id] + len(r.state), generator_phase)
               for r in results}
    return devices.close_round(seconds)


def _tasks(cfg: Config, algorithm: Algorithm, info: RoundInfo, state: GlobalState, params: dict[str, int],
           tier_of: Callable[[int], str]) -> tuple[list[ClientTask], list[dict[str, int]]]:
    """One task per participant, largest tiers first so a small one finishes the round, and the
    bytes each task's artifacts weigh."""
    artifacts: dict[str, dict[str, bytes]] = {}
    tasks = []
    for c in info.participants:
        tier = tier_of(c)
        if tier not in artifacts:
            artifacts[tier] = algorithm.round_artifacts(info, state, tier)
        tasks.append(ClientTask.from_artifacts(info.number, info.phase, c, tier,
                                               task_seed(cfg.seed, info.number, c), artifacts[tier]))
    tasks.sort(key=lambda t: -params[t.tier])
    return tasks, [{name: len(b) for name, b in artifacts[t.tier].items()} for t in tasks]


def format_summary(summary: dict) -> str:
    rows = [f"{'tier':<10}{'params':>9}{'best %':>9}{'final %':>9}"]
    for tier, s in summary["tiers"].items():
        rows.append(f"{tier:<10}{s['params']:>9,}{s['best_acc']:>9.2f}{s['final_acc']:>9.2f}")
    rows.append(f"{'mean':<10}{'':>9}{summary['mean_best_acc']:>9.2f}{summary['mean_final_acc']:>9.2f}")
    rows.append(f"{summary['algorithm']} on {summary['dataset']}: {summary['rounds']} rounds in "
                f"{summary['wall_time_s']:.0f}s; run directory {summary['run_dir']}")
    return "\n".join(rows)
