"""Choose GeFL-F's head-round settings on validation data, from one warm-up and generator.

The warm-up and the 100 generator rounds are most of a GeFL-F run; the head rounds are what
settings such as `gefl.generated_passes`, the head's learning rate or the sampling temperature
change. So the base config runs once to the end of its generator phase and one head round
(`rounds=1`), and each variant goes on from that run's checkpoint with its own head settings for
the remaining head rounds: variants differ only where their settings act, and cost a head phase
each. Every run is scored on the validation split (`eval.split=validation`, training images no
client holds), never on the test set, so the choice can then be reported on the test set.

Writes benchmarks/results/gefl_f_head.{json,md} (or --out); rerunning with the same arguments
goes on where it stopped (finished variants are read back, the base run resumes).

    python benchmarks/gefl_f_head.py --seed 0 --variant passes2 gefl.generated_passes=2 \\
        --variant lr0.05 train.lr=0.05
    python benchmarks/gefl_f_head.py --set num_clients=100 --set partition.samples_per_client=60 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from gefl.config import load_config, to_dict
from gefl.rounds.checkpoint import CHECKPOINT
from gefl.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
VALIDATION = ["eval.split=validation"]


def _finished(run_dir: Path) -> dict | None:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def base_run(config: Path, overrides: list[str], runs_dir: Path) -> Path:
    """The base config to one head round, on validation; resumed or read back when rerun."""
    cfg = load_config(config, [*overrides, *VALIDATION, "rounds=1"])
    run_dir = runs_dir / f"base-{hashlib.sha1(yaml.safe_dump(to_dict(cfg)).encode()).hexdigest()[:10]}"
    if _finished(run_dir) is None:
        print(f"== base run to the first head round: {run_dir}", flush=True)
        simulate(cfg, resume=run_dir) if (run_dir / CHECKPOINT).is_file() else simulate(cfg, out=run_dir)
    return run_dir


def variant_run(base: Path, config: Path, overrides: list[str], settings: list[str], head_rounds: int,
                run_dir: Path) -> dict:
    """The base run's checkpoint, then head rounds 2..head_rounds with `settings`."""
    done = _finished(run_dir)
    if done is not None:
        return done
    cfg = load_config(config, [*overrides, *VALIDATION, f"rounds={head_rounds}", *settings])
    if not (run_dir / CHECKPOINT).is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base, run_dir)
        (run_dir / "summary.json").unlink()
        # The run directory now says it runs the variant's config: the resume below checks that
        # the config it is given is the directory's, and the checkpoint holds round 1 of the head.
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return simulate(cfg, resume=run_dir)


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# GeFL-F head-round settings, chosen on validation data",
        "",
        f"Measured {results['date']} on {results['machine']}; `{results['command']}`.",
        f"Base: `{results['base']}`, seed {results['seed']}, to its first head round; each variant then runs "
        f"head rounds 2-{results['head_rounds']} from that checkpoint with its settings. Accuracy: per tier the "
        "best **validation** accuracy over the evaluations (training images no client holds), mean over "
        "the tiers; final is the last round's.",
        "",
        "| variant | settings | mean best val acc % | mean final val acc % | head phase s |",
        "|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        lines.append(f"| {name} | {' '.join(v['settings']) or '(the base config)'} | {v['mean_best_acc']:.2f} | "
                     f"{v['mean_final_acc']:.2f} | {v['head_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "paper" / "fmnist-gefl-f-light.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the base and every variant (e.g. num_clients=100)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name, then the head-round settings it changes; repeatable")
    parser.add_argument("--head-rounds", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gefl_f_head"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "head"))
    args = parser.parse_args(argv)
    config, runs_dir, out = Path(args.config), Path(args.runs_dir), Path(args.out)
    overrides = [*args.set, f"seed={args.seed}"]
    variants = {"base": [], **{v[0]: v[1:] for v in args.variant}}
    command = "python benchmarks/gefl_f_head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "command": command, "seed": args.seed, "head_rounds": args.head_rounds,
               "base": " ".join([str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                                 *(f"--set {o}" for o in args.set)]), "variants": {}}
    base = base_run(config, overrides, runs_dir)
    for name, settings in variants.items():
        print(f"== variant {name}: {' '.join(settings) or '(the base config)'}", flush=True)
        tag = hashlib.sha1(" ".join([str(base), *settings]).encode()).hexdigest()[:10]
        run_dir = runs_dir / f"variant-{name}-{tag}"
        summary = variant_run(base, config, overrides, settings, args.head_rounds, run_dir)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        head_s = sum(m["seconds"] for m in metrics if m["phase"] == "head" and m["phase_round"] > 1)
        results["variants"][name] = {"settings": settings, "run_dir": str(run_dir), "head_s": head_s,
                                     **{k: summary[k] for k in ("mean_best_acc", "mean_final_acc", "tiers")}}
        write_results(out, results)
        print(f"   {name}: mean best {summary['mean_best_acc']:.2f}, final {summary['mean_final_acc']:.2f} "
              f"(validation), head phase {head_s:.0f} s", flush=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
