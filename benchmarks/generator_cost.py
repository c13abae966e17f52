"""What each generator family's small preset costs on this CPU, and what a paper-schedule run of it takes.

A paper-table row runs 100 generator rounds (5 local epochs of 10 batches of 64 on each of ten
clients) and 50 head rounds (each client draws `generated_passes` x 9 batches of 64 samples). So the
generator's share of a run is those counts times two measured figures: one training step and one
batch of samples, both on one thread as a simulation worker runs them. Dividing by the workers (the
cores) gives the generator's share of the wall time; the warm-up, the classifiers' training and the
evaluations come on top (for a row already measured, the table shows how much: its measured wall
time less the generator's share). DDPM's samples are measured at its preset's
`steps` and at fewer `sample_steps` (a respaced reverse chain, gefl/generators/ddpm.py).

The point is to know before starting a row whether it fits a session: a seed that does not cannot
be finished on this machine, since a new session starts from a fresh checkout.

    python benchmarks/generator_cost.py                 # every family, small presets
    python benchmarks/generator_cost.py --families ddpm-f --sample-steps 10 20 50

Writes benchmarks/results/generator_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gefl.algorithms import generated_shape
from gefl.config import load_config
from gefl.generators import FEATURE, build_generator, generator_spec
from gefl.optim import Adam
from gefl.tiers.models import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_fmnist import VARIANTS, config_path  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "generator_cost"
SAMPLES_PER_CLIENT = 600
ROWS = [f"{family}-small" for family in ("gefl-cvae", "gefl-dcgan", "gefl-ddpm", "gefl-f-cvae", "gefl-f-dcgan",
                                          "gefl-f-ddpm")] + ["gefl-f-light"]
"""Rows of benchmarks/results/paper_fmnist.md, configured as paper_fmnist.py configures them."""


def _median_ms(fn, repeats: int) -> float:
    fn()  # first call: allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(row: str, sample_steps: list[int], repeats: int) -> dict:
    """One row's generator: a training step and a batch of samples, then the run's projection."""
    base, overrides = VARIANTS.get(row, (row, []))
    cfg = load_config(config_path(base, noniid=False), overrides)
    g, batch = cfg.gefl.generator, cfg.train.batch_size
    level = generator_spec(g.family).level
    shape = generated_shape(level, 1)
    torch.manual_seed(0)
    generator = build_generator(g.family, shape, 10, g.preset, g.options)
    x = torch.randn(batch, *shape)
    x = x.relu() if level == FEATURE else x.clamp(-1, 1)  # FE features are >= 0, images in [-1, 1]
    labels = torch.arange(batch) % 10
    optimizer = Adam(generator.parameters(), lr=g.lr)
    with FlopCounterMode(display=False) as flops:  # one whole step: DCGAN's has a discriminator step too
        generator.train_step(x, labels, optimizer)
    train_ms = _median_ms(lambda: generator.train_step(x, labels, optimizer), repeats)
    generator.eval()
    # The key is the reverse chain's length for DDPM, "-" for the families that sample in one pass.
    chains = {"-": generator}
    if g.family.startswith("ddpm"):
        chains = {str(generator.steps): generator}
        for steps in sample_steps:
            respaced = build_generator(g.family, shape, 10, g.preset, {**(g.options or {}), "sample_steps": steps})
            respaced.load_state_dict(generator.state_dict())
            chains[str(steps)] = respaced.eval()
    sample_ms = {}
    for key, sampler in chains.items():
        with torch.no_grad():
            sample_ms[key] = _median_ms(lambda s=sampler: s.sample(labels), repeats)
    train_batches = cfg.gefl.generator_rounds * g.local_epochs * cfg.num_clients * math.ceil(SAMPLES_PER_CLIENT / batch)
    sample_batches = cfg.rounds * cfg.num_clients * cfg.gefl.generated_passes * (SAMPLES_PER_CLIENT // batch)
    return {
        "row": row, "family": g.family, "preset": g.preset, "params": count_parameters(generator),
        "train_step_ms": round(train_ms, 2), "train_step_gflop": round(flops.get_total_flops() / 1e9, 2),
        "sample_ms": {k: round(v, 1) for k, v in sample_ms.items()},
        "train_batches": train_batches, "sample_batches": sample_batches,
        "generator_cpu_s": {k: round((train_batches * train_ms + sample_batches * ms) / 1000)
                            for k, ms in sample_ms.items()},
    }


def _measured_walls() -> dict[str, float]:
    """Each row's median wall time in paper_fmnist.json (rows not measured yet are absent)."""
    path = ROOT / "benchmarks" / "results" / "paper_fmnist.json"
    configs = json.loads(path.read_text())["configs"] if path.is_file() else {}
    return {row: statistics.median(r["wall_time_s"] for r in c["runs"]) for row, c in configs.items() if c["runs"]}


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    workers = results["workers"]
    lines = [
        "# Generator cost per paper-table row, on this CPU",
        "",
        f"Measured {results['date']} on {results['machine']}, one thread, torch {results['torch']}; "
        f"`{results['command']}`.",
        "A training step and a batch of samples (64), median of the repeats; GFLOP/s: the step's counted "
        "floating-point operations (torch's FlopCounterMode, forward and backward) over its time. "
        "Generator CPU: the paper schedule's training steps and head-round sample batches times those "
        f"figures; wall share: over {workers} workers (the cores). Measured wall time: the row's median "
        "in paper_fmnist.md; the rest (warm-up, classifier training, evaluations) is that less the wall share.",
        "",
        "| row | params | train step ms | GFLOP/s | sample steps | sample ms | generator CPU s | wall share s | "
        "measured wall time s | rest s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["rows"]:
        for steps, ms in m["sample_ms"].items():
            cpu = m["generator_cpu_s"][steps]
            wall = m["measured_wall_s"]
            rate = m["train_step_gflop"] / m["train_step_ms"] * 1000
            lines.append(f"| {m['row']} | {m['params']:,} | {m['train_step_ms']:.1f} | {rate:.0f} | {steps} | "
                         f"{ms:.1f} | {cpu:,} | {cpu / workers:,.0f} | {'-' if wall is None else f'{wall:.0f}'} | "
                         f"{'-' if wall is None else f'{wall - cpu / workers:.0f}'} |")
    lines += ["", *results.get("notes", [])]
    out.with_suffix(".md").write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), metavar="ROW",
                        help=f"rows to measure (default: all): {', '.join(ROWS)}")
    parser.add_argument("--sample-steps", nargs="+", type=int, default=[20], metavar="N",
                        help="respaced DDPM chains to time besides the preset's steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure, median kept (default: 3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="simulation workers the wall share divides by (default: the cores)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.workers < 1 or any(s < 1 for s in args.sample_steps):
        parser.error("--repeats, --workers and --sample-steps must be >= 1")
    torch.set_num_threads(1)
    rows, walls = [], _measured_walls()
    for row in args.rows or ROWS:
        m = measure(row, args.sample_steps, args.repeats)
        m["measured_wall_s"] = walls.get(row)
        rows.append(m)
        print(f"{row}: train step {m['train_step_ms']:.1f} ms, samples {m['sample_ms']} ms per 64, "
              f"generator CPU {m['generator_cpu_s']} s", flush=True)
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "command": "python benchmarks/generator_cost.py " + " ".join(sys.argv[1:]),
        "workers": args.workers, "rows": rows,
    }
    write_results(Path(args.out), results)
    print(f"wrote {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
