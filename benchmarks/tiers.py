"""The tier catalogue: what training each registered tier costs, measured, in configs/tiers.yaml.

A device picks the largest tier it can train in time and in memory (gefl/devices.py), but it
cannot afford to try them all: it times the reference tier once and scales by this catalogue.
So the catalogue holds per tier the parameters, the FLOPs of a training step (exact and machine
independent), the memory a training process adds on top of the runtime, and the throughput
measured here, against which the FLOPs-based estimate can be checked.

Memory is measured in a fresh single-threaded process per tier and run (`--one TIER`): a process
that has already built other models keeps their freed memory in its allocator, and its peak memory
would describe them, not this tier. The median of `--runs` processes is kept.

    python benchmarks/tiers.py                     # every registered tier; rewrites configs/tiers.yaml
    python benchmarks/tiers.py --tiers cnn3 cnn5   # re-measure some, keep the other rows
    python benchmarks/tiers.py --one cnn3          # one measurement in this process, as JSON

Also writes benchmarks/results/tiers.json (every run) and tiers.md (a table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gefl.edge_client.probe import cpu_model

from gefl.models import OPT_IN_TIERS, count_parameters, get_model, list_tiers

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "configs" / "tiers.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "tiers"
REFERENCE_TIER = "cnn3"
"""The tier a device times itself on (edge_client/probe.py); the others are scaled from it by FLOPs."""
BATCH_SIZE = 64
INPUT_SHAPE = (1, 32, 32)
MEMORY_STEPS = 5
LR, MOMENTUM = 0.01, 0.5
"""The probe's optimiser: momentum buffers are part of what training holds."""
TIME_BUDGET_S = 2.0
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 5, 50
_MB = 1024**2

MEASURED = ("params", "train_mflops_per_sample", "train_memory_mb", "train_samples_per_s")

HEADER = f"""\
# Tier catalogue: what training each registered tier costs. Written by benchmarks/tiers.py, which
# rewrites the measured columns (`python benchmarks/tiers.py`); keys it does not know are kept.
#
# Top level:
#   reference_tier     the tier a device times itself on (edge_client/probe.py); other tiers' speed
#                      is estimated from it by the ratio of train_mflops_per_sample
#   batch_size         the batch of every measurement below
#   runtime_memory_mb  RSS of a Python process with torch and gefl.models imported, 1 thread, after
#                      building one optimizer (torch.optim's first use imports torch._dynamo) and
#                      before any model: every tier pays it on top of train_memory_mb. It depends on
#                      the torch wheel (a CUDA build maps CUDA libraries even with no GPU)
#   machine, measured  where and when train_samples_per_s was measured (the other columns do not
#                      depend on the machine, up to allocator noise in the memory)
# Per tier:
#   params                   parameters of the whole network (common FE + head), as get_model builds it
#   train_mflops_per_sample  FLOPs of one training step (forward + backward, cross-entropy) on a batch of
#                            {BATCH_SIZE} 1x32x32 images, divided by {BATCH_SIZE}, in millions; counted by
#                            torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, a
#                            multiply-add = 2 FLOPs; elementwise ops, norms and pooling are not counted)
#   train_memory_mb          peak anonymous memory (RssAnon, sampled every 0.5 ms; tensors, gradients,
#                            optimizer state, Python objects) added by building the tier and running
#                            {MEMORY_STEPS} SGD steps (lr {LR}, momentum {MOMENTUM}, batch {BATCH_SIZE}) in a fresh
#                            1-thread process with glibc's mmap threshold fixed; median of 3 processes. Library
#                            code pages are shared and reclaimable and belong to runtime_memory_mb
#   train_samples_per_s      training samples per second on `machine` at 1 thread, batch {BATCH_SIZE}
#                            (median step time after warm-up)
#   opt_in                   true for the larger tiers no default config lists; a federation names them
# MB = 2**20 bytes.
"""


# --------------------------------------------------------------------------- measurements


def train_mflops_per_sample(tier: str, batch_size: int = BATCH_SIZE) -> float:
    """FLOPs of one forward + backward step per sample, in millions. Counted, not timed: the same
    on every machine, which is what lets a device scale its one timed tier to all the others."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = get_model(tier).train()
    x, y = torch.randn(batch_size, *INPUT_SHAPE), torch.randint(10, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch_size / 1e6


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _anon_bytes() -> int:
    """RssAnon: tensors, gradients, optimizer state and Python objects. File-backed pages (library
    code) are left out on purpose: they are shared, reclaimable, and how many stay resident depends
    on the page cache, not on the tier (they made a whole-RSS peak swing by 20 MB between runs)."""
    match = re.search(r"^RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else _rss_bytes()


class _AnonPeak(threading.Thread):
    """Samples RssAnon every half millisecond: the kernel keeps no peak of anonymous memory alone,
    and the peak of a training step (activations held for backward) lasts only milliseconds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _anon_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _anon_bytes())
            self._done.wait(0.0005)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _anon_bytes())
        return self.peak


def _rss_split_mb() -> dict[str, float]:
    """RssAnon and RssFile (Linux), for the record."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    found = re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.M)
    return {key: int(kb) / 1024 for key, kb in found}


def measure_here(tier: str, timed: bool = True) -> dict:
    """Memory and (if `timed`) throughput of training `tier` in this process, which must be fresh.

    Only `measure_train_memory` and `--one` should call it: the process must not have built a
    model before, and it sets torch to one thread.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # The first optimizer a process builds imports torch._dynamo and some 900 modules (~175 MB of RSS
    # with torch 2.15): a cost of training at all, paid once whatever the tier, so it is runtime.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    gc.collect()
    baseline = _rss_bytes()  # after importing psutil, so that is part of the runtime too
    runtime_split = _rss_split_mb()
    anon_baseline = _anon_bytes()
    sampler = _AnonPeak()
    sampler.start()
    model = get_model(tier).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = torch.randn(BATCH_SIZE, *INPUT_SHAPE), torch.randint(10, (BATCH_SIZE,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(MEMORY_STEPS):
        step()
    peak = sampler.stop()
    result = {
        "tier": tier, "runtime_memory_mb": baseline / _MB,
        "train_memory_mb": (peak - anon_baseline) / _MB, "peak_method": "sampled RssAnon",
        # Informative only: anonymous vs file-backed (library code) RSS, before and after training.
        "runtime_rss_split_mb": runtime_split, "trained_rss_split_mb": _rss_split_mb(),
    }
    if timed:  # the memory steps were the warm-up
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < MAX_TIMED_STEPS and (
            len(times) < MIN_TIMED_STEPS or time.perf_counter() - started < TIME_BUDGET_S
        ):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        result["step_s"] = times
        result["train_samples_per_s"] = BATCH_SIZE / statistics.median(times)
    return result


def measure_fresh(tier: str, timed: bool = True) -> dict:
    """`measure_here` in a new single-threaded process (`python benchmarks/tiers.py --one TIER`)."""
    # A fixed mmap threshold: glibc otherwise raises it as tensors are freed, so whether a freed
    # activation goes back to the OS or stays in the heap (and in RSS) varied from run to run,
    # which made small tiers' figures swing by +-30 %; with it, repeated runs agree within 0.3 MB.
    # Only memory runs get it: every large tensor then costs an mmap, which halves training speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not timed:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", tier] + ([] if timed else ["--untimed"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {tier} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_train_memory(tier: str, runs: int = 3) -> float:
    """The catalogue's train_memory_mb: median over `runs` fresh processes, in MB."""
    return statistics.median(measure_fresh(tier, timed=False)["train_memory_mb"] for _ in range(runs))


# --------------------------------------------------------------------------- the catalogue


def measure_tier(tier: str, runs: int) -> dict:
    rows = [measure_fresh(tier, timed=False) for _ in range(runs)]
    timed = [measure_fresh(tier) for _ in range(runs)]
    return {
        "params": count_parameters(get_model(tier)),
        "train_mflops_per_sample": train_mflops_per_sample(tier),
        "train_memory_mb": statistics.median(r["train_memory_mb"] for r in rows),
        "train_samples_per_s": statistics.median(r["train_samples_per_s"] for r in timed),
        "opt_in": tier in OPT_IN_TIERS,
        "runs": rows,
    }


def _rounded(m: dict) -> dict:
    return {
        "params": m["params"],
        "train_mflops_per_sample": round(m["train_mflops_per_sample"], 4),
        "train_memory_mb": round(m["train_memory_mb"], 2),
        "train_samples_per_s": round(m["train_samples_per_s"], 1),
        "opt_in": m["opt_in"],
    }


def write_catalogue(path: Path, measured: dict[str, dict], runtime_mb: float, machine: str, date: str) -> dict:
    """Rewrite the measured columns; rows of tiers not measured this time and keys this script does
    not write are kept, rows of tiers no longer registered are dropped."""
    import yaml

    old = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    old_tiers = old.get("tiers") or {}
    tiers = {}
    for tier in list_tiers():
        row = dict(old_tiers.get(tier) or {})
        if tier in measured:
            row.update(_rounded(measured[tier]))
        row["opt_in"] = tier in OPT_IN_TIERS
        if not all(k in row for k in MEASURED):
            raise RuntimeError(f"tier {tier} is neither measured now nor in {path}; run without --tiers")
        tiers[tier] = {**{k: row[k] for k in (*MEASURED, "opt_in")}, **row}
    data = {k: v for k, v in old.items() if k != "tiers"}
    data.update({
        "reference_tier": REFERENCE_TIER,
        "batch_size": BATCH_SIZE,
        "runtime_memory_mb": round(runtime_mb, 1),
        "machine": machine,
        "measured": date,
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda} build)" if torch.version.cuda else " (CPU build)"),
    })
    data["tiers"] = tiers
    path.write_text(HEADER + yaml.safe_dump(data, sort_keys=False, width=120))
    return data


def flops_predicted_samples_per_s(measured: dict[str, dict], tier: str) -> float:
    """What a device would predict for `tier` from the reference tier's measured speed and the
    FLOPs ratio (gefl/devices.py's estimate), to set beside what `tier` really does here."""
    ref = measured[REFERENCE_TIER]
    return ref["train_samples_per_s"] * ref["train_mflops_per_sample"] / measured[tier]["train_mflops_per_sample"]


def write_results(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    tiers = result["tiers"]
    lines = [
        f"# Tier catalogue ({result['date']}, {result['machine']}, torch {result['torch']})",
        "",
        f"Training at batch {BATCH_SIZE} on 1x32x32 inputs, 1 thread; written by `python benchmarks/tiers.py`, "
        "which also rewrites configs/tiers.yaml (columns explained in its header). "
        f"Runtime memory (Python + torch + one optimizer, before any model): {result['runtime_memory_mb']:.1f} MB. "
        f"Train memory: peak anonymous memory (RssAnon) above that, median of {result['runs']} fresh processes "
        "(min-max in brackets).",
        "",
        "Effective GFLOP/s = MFLOPs/sample x samples/s. FLOPs-predicted = the reference tier's measured "
        "samples/s scaled by the FLOPs ratio (the device policy's estimate); predicted / measured > 1 means "
        "the estimate is optimistic." if REFERENCE_TIER in tiers else "",
        "",
        "| tier | params | MFLOPs/sample | train memory MB | samples/s | effective GFLOP/s "
        "| FLOPs-predicted samples/s | predicted / measured | opt-in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tier, m in tiers.items():
        memory = [r["train_memory_mb"] for r in m["runs"]]
        predicted = flops_predicted_samples_per_s(tiers, tier) if REFERENCE_TIER in tiers else None
        lines.append(
            f"| {tier} | {m['params']:,} | {m['train_mflops_per_sample']:.2f} | {m['train_memory_mb']:.1f} "
            f"({min(memory):.1f}-{max(memory):.1f}) | {m['train_samples_per_s']:,.0f} | "
            f"{m['train_mflops_per_sample'] * m['train_samples_per_s'] / 1e3:.2f} | "
            + (f"{predicted:,.0f} | {predicted / m['train_samples_per_s']:.2f} | " if predicted else "- | - | ")
            + f"{'yes' if m['opt_in'] else ''} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", nargs="+", default=None, help="tiers to measure (default: all registered)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per tier (median kept)")
    parser.add_argument("--catalogue", default=str(CATALOGUE))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--one", metavar="TIER", help=argparse.SUPPRESS)
    parser.add_argument("--untimed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_here(args.one, timed=not args.untimed)))
        return 0

    tiers = args.tiers or list_tiers()
    unknown = [t for t in tiers if t not in list_tiers()]
    if unknown:
        parser.error(f"unknown tiers {unknown}; registered: {', '.join(list_tiers())}")
    measured = {}
    for tier in tiers:
        measured[tier] = m = measure_tier(tier, args.runs)
        print(f"{tier:<20} {m['params']:>11,} params  {m['train_mflops_per_sample']:>9.2f} MFLOPs/sample  "
              f"{m['train_memory_mb']:>7.1f} MB  {m['train_samples_per_s']:>8.0f} samples/s", flush=True)
    runtime = statistics.median(r["runtime_memory_mb"] for m in measured.values() for r in m["runs"])
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    date = time.strftime("%Y-%m-%d")
    write_catalogue(Path(args.catalogue), measured, runtime, machine, date)
    if REFERENCE_TIER in measured:
        for tier, m in measured.items():
            m["flops_predicted_samples_per_s"] = flops_predicted_samples_per_s(measured, tier)
    result = {"date": date, "machine": machine, "cores": os.cpu_count(), "torch": torch.__version__,
              "cuda_build": torch.version.cuda, "runtime_memory_mb": runtime, "runs": args.runs,
              "batch_size": BATCH_SIZE, "tiers": measured}
    write_results(Path(args.out), result)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
