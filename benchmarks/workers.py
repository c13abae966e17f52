"""How to spend two cores on simulated clients: one process with N threads, or N single-threaded workers.

Runs the paper's FedAvg round (10 clients, ten tiers, 600 images, 5 local epochs) both ways, in
one run, and reports the median seconds of the rounds that do no evaluation. Writes
benchmarks/results/workers.json and .md.

    python benchmarks/workers.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gefl.config import load_config
from gefl.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent


def round_seconds(workers: int, rounds: int, tmp: Path) -> list[float]:
    cfg = load_config(ROOT / "configs" / "paper" / "fmnist-fedavg.yaml",
                      [f"rounds={rounds}", "eval.every=1000", f"workers={workers}"])
    out = tmp / f"w{workers}"
    simulate(cfg, out=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records if "accuracy" not in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "workers"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(cores)
        rows[f"1 process x {cores} threads"] = round_seconds(1, args.rounds, Path(tmp))
        rows[f"{cores} worker processes x 1 thread"] = round_seconds(cores, args.rounds, Path(tmp))
    result = {
        "date": time.strftime("%Y-%m-%d"), "cores": cores, "torch": torch.__version__,
        "setting": "paper FedAvg round: 10 clients, ten tiers, 600 images each, 5 local epochs, batch 64",
        "round_seconds": rows, "median_round_s": {k: statistics.median(v) for k, v in rows.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Client execution on {cores} cores ({result['date']}, torch {torch.__version__})", "",
             result["setting"] + "; median over the rounds without evaluation.", "",
             "| execution | median round s | rounds timed |", "|---|---|---|"]
    lines += [f"| {k} | {statistics.median(v):.2f} | {len(v)} |" for k, v in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
