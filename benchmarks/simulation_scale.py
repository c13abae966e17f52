"""Where each executor stops being worth it: seconds per round and memory against the number of clients.

Runs one short FedAvg simulation per row, on the local worker pool (`executor: local`) and on a
Ray instance started for the run (`executor: ray`, `ray.address: ""`), for 10, 100 and 1000
clients at full participation and 1000 clients at `client_fraction` 0.1. The workload is the same
per client at every scale (the paper's 100-client share: 60 Fashion-MNIST images, one local epoch
at batch 16, the ten tiers) so that what changes down a column is the executor's overhead and the
number of clients, not the training. Evaluation runs at the first and last round only; the median
is over the rounds without it.

Each row runs in its own process, which a sampler thread watches every 0.2 s: the peak RSS of the
driver, the peak RSS of the largest client worker (a pool worker, or a Ray actor), and the peak of
the proportional set size (PSS) summed over the driver and everything it started (for Ray, also
its GCS, raylet and helpers), which counts memory that forked workers share once. A row that has
finished is kept in benchmarks/results/simulation_scale.json; running the script again runs only
the rows still missing (`--fresh` runs them all).

    python benchmarks/simulation_scale.py                 # every row still missing
    python benchmarks/simulation_scale.py --rows local-1000 ray-1000 --fresh
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "simulation_scale"
ROUNDS = 4
"""Rounds per row: the first and last evaluate, so two rounds are timed without evaluation."""

SCALES = [(10, 1.0), (100, 1.0), (1000, 1.0), (1000, 0.1)]
ROWS = {f"{executor}-{n}" + ("" if fraction == 1.0 else f"-f{fraction}"): (executor, n, fraction)
        for n, fraction in SCALES for executor in ("local", "ray")}


def _overrides(executor: str, clients: int, fraction: float) -> list[str]:
    return [f"num_clients={clients}", "partition.samples_per_client=60", "train.local_epochs=1",
            "train.batch_size=16", f"rounds={ROUNDS}", f"eval.every={ROUNDS - 1}", f"client_fraction={fraction}",
            f"executor={executor}", "ray.address="]


class Sampler(threading.Thread):
    """Peak memory of this process and of everything it started, sampled until `stop()`."""

    def __init__(self, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.me = psutil.Process()
        self.driver_rss = self.worker_rss = self.total_pss = 0
        self.workers_seen = 0
        self._done = threading.Event()

    def _sample(self) -> None:
        self.driver_rss = max(self.driver_rss, self.me.memory_info().rss)
        total, worker_rss, workers = 0, 0, 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
                if proc.pid != self.me.pid and self._is_worker(proc):
                    workers += 1
                    worker_rss = max(worker_rss, proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.total_pss = max(self.total_pss, total)
        self.worker_rss = max(self.worker_rss, worker_rss)
        self.workers_seen = max(self.workers_seen, workers)

    @staticmethod
    def _is_worker(proc: psutil.Process) -> bool:
        """A pool worker (a fork of the driver) or a Ray client actor; not Ray's own services."""
        name = proc.name()
        if name.startswith("ray::"):
            return "_ClientActor" in name
        cmdline = " ".join(proc.cmdline())
        return "ray" not in cmdline and name not in ("raylet", "gcs_server")

    def run(self) -> None:
        while not self._done.wait(self.period_s):
            self._sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_row(name: str) -> dict:
    """One row, in this process; returns its figures."""
    import torch

    from gefl.config import load_config
    from gefl.simulation import simulate

    executor, clients, fraction = ROWS[name]
    cfg = load_config(ROOT / "configs" / "paper" / "fmnist-fedavg.yaml", _overrides(executor, clients, fraction))
    sampler = Sampler()
    sampler.start()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, out=Path(tmp) / "run")
        wall = time.monotonic() - started
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    sampler.stop()
    rounds = [r["seconds"] for r in records if "accuracy" not in r]
    return {
        "row": name, "executor": executor, "clients": clients, "client_fraction": fraction,
        "per_round": max(1, round(clients * fraction)), "workers": cfg.workers or os.cpu_count(),
        "round_seconds": rounds, "median_round_s": statistics.median(rounds),
        "evaluated_round_s": [r["seconds"] for r in records if "accuracy" in r],
        "wall_s": wall, "outside_rounds_s": wall - sum(r["seconds"] for r in records),
        "driver_peak_rss_mb": sampler.driver_rss / 2**20, "worker_peak_rss_mb": sampler.worker_rss / 2**20,
        "total_peak_pss_mb": sampler.total_pss / 2**20, "worker_processes": sampler.workers_seen,
        "final_mean_accuracy": records[-1].get("mean_accuracy"), "torch": torch.__version__,
    }


def _markdown(result: dict) -> str:
    lines = [f"# Simulation executors against the number of clients ({result['date']}, {result['machine']})", "",
             result["setting"], "",
             "| clients | per round | executor | median round s | s per client trained | outside rounds s "
             "| driver peak RSS MB | largest worker peak RSS MB | all processes peak PSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        row = result["rows"].get(name)
        if row is None:
            continue
        lines.append(f"| {row['clients']} | {row['per_round']} | {row['executor']} | {row['median_round_s']:.2f} "
                     f"| {row['median_round_s'] / row['per_round']:.4f} | {row['outside_rounds_s']:.1f} "
                     f"| {row['driver_peak_rss_mb']:.0f} | {row['worker_peak_rss_mb']:.0f} "
                     f"| {row['total_peak_pss_mb']:.0f} |")
    missing = [name for name in ROWS if name not in result["rows"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--fresh", action="store_true", help="run the rows again even where a result is kept")
    parser.add_argument("--one", choices=list(ROWS), help=argparse.SUPPRESS)  # a single row, in a child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_row(args.one)))
        return 0
    path = OUT.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    result.update({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "setting": ("FedAvg over the ten tiers, 60 IID Fashion-MNIST images per client, one local epoch at batch "
                    f"16, {ROUNDS} rounds (the first and last evaluate; the median is over the others); local: the "
                    "fork pool of this machine, one worker per core; ray: a Ray instance started by the run, one "
                    "actor per core (ray.cpus 1). Memory sampled every 0.2 s."),
    })
    for name in args.rows:
        if name in result["rows"] and not args.fresh:
            print(f"{name}: kept from {path.name}", flush=True)
            continue
        print(f"{name}: running", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        result["rows"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        OUT.with_suffix(".md").write_text(_markdown(result))
        row = result["rows"][name]
        print(f"{name}: median round {row['median_round_s']:.2f} s, driver {row['driver_peak_rss_mb']:.0f} MB, "
              f"total PSS {row['total_peak_pss_mb']:.0f} MB", flush=True)
    print(OUT.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
