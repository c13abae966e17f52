"""Reproduce the paper's Fashion-MNIST table on this machine, side by side in one run.

Runs every config for every seed with `gefl.simulate`, then writes
benchmarks/results/paper_fmnist.json (every run's numbers) and .md (a table: mean best accuracy,
the paper's metric, mean final accuracy, median wall time, the paper's number). Results are
rewritten after each run, so an interrupted benchmark still leaves what it measured.

    python benchmarks/paper_fmnist.py                       # all four configs, seeds 0 1 2
    python benchmarks/paper_fmnist.py --seeds 0 --configs fedavg gefl-f-cvae
    python benchmarks/paper_fmnist.py --seeds 2 --resume    # add seed 2 to the existing results

`quickstart` is accepted as a config name too (configs/quickstart.yaml), to time the README's run,
and so are the ablations in VARIANTS (a paper config with overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gefl.config import load_config
from gefl.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["quickstart", "fedavg", "fedprox", "lg-fedavg", "gefl-f-cvae"]
VARIANTS = {
    # GeFL-F's schedule (20 warm-up + 50 head rounds, FE frozen after warm-up) without any generator:
    # what the generated features add, as opposed to the schedule itself.
    "gefl-f-no-generator": ("gefl-f-cvae", ["gefl.generator_rounds=0", "gefl.generated_passes=0"]),
}
PAPER = {
    "fedavg": (80.58, "FedAvg"),
    "fedprox": (80.50, "FedProx"),
    "lg-fedavg": (80.61, "LG-FedAvg"),
    "gefl-f-cvae": (82.33, "GeFL (CVAE), image-level: the paper's closest row"),
}


def summarise(runs: list[dict]) -> dict:
    best = [r["mean_best_acc"] for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "mean_best_acc": statistics.mean(best),
        "std_best_acc": statistics.stdev(best) if len(best) > 1 else 0.0,
        "mean_final_acc": statistics.mean(r["mean_final_acc"] for r in runs),
        "median_wall_time_s": statistics.median(r["wall_time_s"] for r in runs),
    }


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "# Fashion-MNIST, paper setting (10 clients x 600 IID images, ten tiers)",
        "",
        f"Measured {results['date']} on {results['machine']}; `{results['command']}`.",
        "Accuracy: per tier the best test accuracy over the evaluations (round 1, every 10th, last), "
        "mean over the ten tiers, then mean over seeds.",
        "",
        "| config | seeds | mean best acc % | std | mean final acc % | median wall time s | paper % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results["configs"].items():
        s = res["summary"]
        paper, label = PAPER.get(name, (None, ""))
        paper_text = f"{paper:.2f} ({label})" if paper is not None else "-"
        rows.append(
            f"| {name} | {','.join(map(str, s['seeds']))} | {s['mean_best_acc']:.2f} | {s['std_best_acc']:.2f} | "
            f"{s['mean_final_acc']:.2f} | {s['median_wall_time_s']:.0f} | {paper_text} |"
        )
    cfgs = results["configs"]
    if "fedavg" in cfgs and "gefl-f-cvae" in cfgs:
        common = sorted(set(cfgs["fedavg"]["summary"]["seeds"]) & set(cfgs["gefl-f-cvae"]["summary"]["seeds"]))
        if common:
            def on(name: str) -> float:
                return statistics.mean(r["mean_best_acc"] for r in cfgs[name]["runs"] if r["seed"] in common)

            delta = on("gefl-f-cvae") - on("fedavg")
            rows += ["", f"GeFL-F (CVAE-F) minus FedAvg, mean best accuracy on seeds {common}: {delta:+.2f} points."]
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help=f"names under configs/paper/fmnist-* ({CONFIGS})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_fmnist"),
                        help="results path without suffix (.json and .md are written)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"), help="where each run's directory goes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the results file and skip (config, seed) pairs it has")
    args = parser.parse_args(argv)

    command = "python benchmarks/paper_fmnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": command,
        "configs": {},
    }
    previous = Path(args.out).with_suffix(".json")
    if args.resume and previous.is_file():
        results = json.loads(previous.read_text())
        results["command"] += f"; then {command}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:  # seed-major, so a cut-short benchmark still compares configs on equal seeds
        for name in args.configs:
            if any(r["seed"] == seed for r in results["configs"].get(name, {}).get("runs", [])):
                continue
            base, variant = VARIANTS.get(name, (name, []))
            path = ROOT / "configs" / ("quickstart.yaml" if base == "quickstart" else f"paper/fmnist-{base}.yaml")
            cfg = load_config(path, [*variant, *args.set, f"seed={seed}"])
            print(f"== {name} seed {seed}", flush=True)
            summary = simulate(cfg, out=Path(args.runs_dir) / f"{stamp}-{name}-s{seed}",
                               progress=lambda msg: print(f"   {msg}", flush=True) if "acc" in msg else None)
            source = " ".join([str(path.relative_to(ROOT)), *(f"--set {v}" for v in variant)])
            entry = results["configs"].setdefault(name, {"config": source, "runs": []})
            entry["runs"].append({k: summary[k] for k in ("seed", "mean_best_acc", "mean_final_acc", "wall_time_s",
                                                          "tiers", "rounds")})
            entry["summary"] = summarise(entry["runs"])
            write_results(Path(args.out), results)
            print(f"   {name} seed {seed}: mean best {summary['mean_best_acc']:.2f}, "
                  f"final {summary['mean_final_acc']:.2f}, {summary['wall_time_s']:.0f}s", flush=True)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
