"""The tier catalogue: what training each registered tier costs, measured, in configs/tiers.yaml.

A device picks the largest tier it can train in time and in memory (gefl/tiers/devices.py), but it
cannot afford to try them all: it times the reference tier once and scales by this catalogue.
So the catalogue holds per tier the parameters, the FLOPs of a training step (exact and machine
independent), the memory a training process adds on top of the runtime, and the throughput
measured here, against which the FLOPs-based estimate can be checked.

Memory is measured in a fresh single-threaded process per tier and run (`--one TIER`): a process
that has already built other models keeps their freed memory in its allocator, and its peak memory
would describe them, not this tier. The median of `--runs` processes is kept.

Memory depends on the torch build, so it is measured under two interpreters. The one running this
script (here the CUDA build pip brings on x86) measures everything; `--python PATH` names a second
one, typically a venv with the CPU-only build that every real board runs (PyPI's aarch64 torch is
CPU-only, and an x86 machine without a GPU can install it from download.pytorch.org/whl/cpu), and
measures memory only there (untimed: throughput comes from the main run). Each interpreter's build
decides the columns it fills: the CUDA build's figures go to train_memory_mb / runtime_memory_mb, the
CPU build's to train_memory_mb_cpu / runtime_memory_mb_cpu. The tiers built from torchvision
backbones (TORCHVISION_TIERS, the opt-in mobilenet-v3-small and resnet18) are measured only under an
interpreter that can import torchvision; elsewhere their column is left null.

    python benchmarks/tiers.py --python /work/venv-cpu/bin/python   # every tier, both builds
    python benchmarks/tiers.py --tiers cnn3 cnn5   # re-measure some, keep the other rows and columns
    python benchmarks/tiers.py --memory-only --python /work/venv-cpu/bin/python
                                                   # memory only; keep train_samples_per_s (timing wants
                                                   # a quiet machine, memory does not care)
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

from gefl.optim import SGD
from gefl.tiers.models import OPT_IN_TIERS, count_parameters, get_model, list_tiers

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

TORCHVISION_TIERS = ("mobilenet-v3-small", "resnet18")
"""Tiers gefl.tiers.models builds on torchvision backbones, measured only where torchvision imports. The
CPU-only venv of a board (the `client` extra) has no torchvision, and PyPI's torchvision wheels are
each built against one torch release, so the registry's does not import against an older CPU torch:
these tiers' _cpu columns stay null there, and the policy charges them the CUDA build's figure."""

BUILDS = {"cuda": "", "cpu": "_cpu"}
"""Column suffix per torch build: train_memory_mb is the CUDA build's, train_memory_mb_cpu the CPU build's."""
BUILD_NAMES = {"cuda": "CUDA build", "cpu": "CPU build"}

MEASURED = ("params", "train_mflops_per_sample", "train_memory_mb", "train_memory_mb_cpu", "train_samples_per_s")
"""Columns every row must have; train_memory_mb_cpu may be null (TORCHVISION_TIERS)."""

HEADER = f"""\
# Tier catalogue: what training each registered tier costs. Written by benchmarks/tiers.py, which
# rewrites the measured columns (`python benchmarks/tiers.py --python CPU-VENV/bin/python`); keys it
# does not know, and columns of a build it did not measure this time, are kept.
#
# Memory depends on the torch build, so every memory figure comes twice: the plain column is the CUDA
# build's (what pip installs on x86 by default, and what a Jetson or a GPU desktop runs), the _cpu
# column the CPU-only build's (what every Raspberry Pi runs: PyPI's aarch64 torch is CPU-only).
# gefl/tiers/devices.py charges a device with CUDA the plain columns and one without CUDA the _cpu ones.
#
# Top level:
#   reference_tier         the tier a device times itself on (edge_client/probe.py); other tiers' speed
#                          is estimated from it by the ratio of train_samples_per_s
#   batch_size             the batch of every measurement below
#   runtime_memory_mb      RSS of a Python process with torch, gefl.tiers.models and gefl.optim (the clients'
#   runtime_memory_mb_cpu  optimizers, which do not import torch._dynamo) imported, 1 thread, before any
#                          model: every tier pays it on top of train_memory_mb(_cpu). The CUDA
#                          build maps its CUDA libraries even with no GPU, hence the difference
#   torch, torch_cpu       the builds (torch.__version__) that measured the plain and the _cpu columns
#   memory_measured        when they did
#   machine, measured,     where, when and with which torch train_samples_per_s was timed (the other
#   timed_with             columns do not depend on the machine, up to allocator noise in the memory)
# Per tier:
#   params                   parameters of the whole network (common FE + head), as get_model builds it
#   train_mflops_per_sample  FLOPs of one training step (forward + backward, cross-entropy) on a batch of
#                            {BATCH_SIZE} 1x32x32 images, divided by {BATCH_SIZE}, in millions; counted by
#                            torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, a
#                            multiply-add = 2 FLOPs; elementwise ops, norms and pooling are not counted)
#   train_memory_mb          peak anonymous memory (RssAnon, sampled every 0.5 ms; tensors, gradients,
#   train_memory_mb_cpu      optimizer state, Python objects) added by building the tier and running
#                            {MEMORY_STEPS} SGD steps (lr {LR}, momentum {MOMENTUM}, batch {BATCH_SIZE}) in a fresh
#                            1-thread process with glibc's mmap threshold fixed; median of 3 processes. Library
#                            code pages are shared and reclaimable and belong to runtime_memory_mb. null in
#                            the _cpu column: not measurable there ({', '.join(TORCHVISION_TIERS)} need
#                            torchvision, which the CPU venv lacks); the policy then uses train_memory_mb
#   train_samples_per_s      training samples per second on `machine` at 1 thread, batch {BATCH_SIZE}
#                            (median step time after warm-up), timed with `timed_with`
#   opt_in                   true for the larger tiers no default config lists; a federation names them
# MB = 2**20 bytes.
"""


def column(name: str, build: str) -> str:
    """`train_memory_mb` -> `train_memory_mb_cpu` for the CPU build, unchanged for the CUDA build."""
    return name + BUILDS[build]


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


def _peak_rss_mb() -> float:
    """VmHWM, the peak RSS of this process's address space. Not ru_maxrss: Linux carries that over
    exec from the forked parent, so a child of an 800 MB process reported 600 MB for itself."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def measure_here(tier: str, timed: bool = True) -> dict:
    """Memory and (if `timed`) throughput of training `tier` in this process, which must be fresh.

    Only `measure_train_memory` and `--one` should call it: the process must not have built a
    model before, and it sets torch to one thread.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # gefl's own SGD, as the clients train with: torch.optim's first step would import torch._dynamo
    # and some 900 modules (73 MB on the CPU build) that a client never loads.
    gc.collect()
    baseline = _rss_bytes()  # after importing psutil, so that is part of the runtime too
    runtime_split = _rss_split_mb()
    anon_baseline = _anon_bytes()
    sampler = _AnonPeak()
    sampler.start()
    model = get_model(tier).train()
    opt = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = torch.randn(BATCH_SIZE, *INPUT_SHAPE), torch.randint(10, (BATCH_SIZE,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(MEMORY_STEPS):
        step()
    peak = sampler.stop()
    result = {
        "tier": tier, "torch": torch.__version__, "build": "cpu" if torch.version.cuda is None else "cuda",
        "runtime_memory_mb": baseline / _MB,
        "train_memory_mb": (peak - anon_baseline) / _MB, "peak_method": "sampled RssAnon",
        # Informative only: anonymous vs file-backed (library code) RSS, before and after training, and
        # the whole process's peak RSS (import included: what an OOM killer would have seen).
        "runtime_rss_split_mb": runtime_split, "trained_rss_split_mb": _rss_split_mb(),
        "peak_rss_mb": _peak_rss_mb(),
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


def _child_env(timed: bool) -> dict[str, str]:
    # A fixed mmap threshold: glibc otherwise raises it as tensors are freed, so whether a freed
    # activation goes back to the OS or stays in the heap (and in RSS) varied from run to run,
    # which made small tiers' figures swing by +-30 %; with it, repeated runs agree within 0.3 MB.
    # Only memory runs get it: every large tensor then costs an mmap, which halves training speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not timed:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    return env


def measure_fresh(tier: str, timed: bool = True, python: str = sys.executable) -> dict:
    """`measure_here` in a new single-threaded process (`PYTHON benchmarks/tiers.py --one TIER`)."""
    cmd = [python, str(Path(__file__).resolve()), "--one", tier] + ([] if timed else ["--untimed"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(timed), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {tier} under {python} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_train_memory(tier: str, runs: int = 3, python: str = sys.executable) -> float:
    """The catalogue's train_memory_mb (or _cpu, by `python`'s build): median over `runs` fresh processes, in MB."""
    return statistics.median(measure_fresh(tier, timed=False, python=python)["train_memory_mb"] for _ in range(runs))


_INTERPRETER_CODE = """
import json, sys
import torch
try:
    import torchvision
    tv = torchvision.__version__
except Exception:  # absent, or built against another torch release
    tv = None
print(json.dumps({"python": sys.executable, "prefix": sys.prefix, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "torchvision": tv}))
"""


def _disk_mb(path: Path) -> float:
    """What `du -s` says of a directory (allocated blocks, links not followed), in MB."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total / _MB


def describe_interpreter(python: str) -> dict:
    """Which torch build `python` runs, whether it can build the torchvision tiers, and how much disk
    its environment takes (the install a machine of that kind needs, besides the OS)."""
    proc = subprocess.run([python, "-c", _INTERPRETER_CODE], capture_output=True, text=True, timeout=600,
                          env=_child_env(timed=True))
    if proc.returncode != 0:
        raise RuntimeError(f"{python} cannot import torch (exit {proc.returncode}):\n{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["build"] = "cpu" if info["cuda"] is None else "cuda"
    info["environment_mb"] = _disk_mb(Path(info["prefix"]))
    return info


# --------------------------------------------------------------------------- the catalogue


def _memory(tier: str, runs: int, python: str) -> dict:
    rows = [measure_fresh(tier, timed=False, python=python) for _ in range(runs)]
    return {"train_memory_mb": statistics.median(r["train_memory_mb"] for r in rows),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows), "runs": rows}


def measure_tier(tier: str, runs: int, interpreters: list[dict], timed: bool = True) -> dict:
    """Everything under the first interpreter (this one; throughput only if `timed`); memory alone under
    the others, where they can build the tier. `memory` maps each build measured to its figures;
    `skipped` lists the builds that could not build it."""
    main = interpreters[0]
    timings = [measure_fresh(tier, python=main["python"]) for _ in range(runs)] if timed else []
    memory, skipped = {}, []
    for info in interpreters:
        if tier in TORCHVISION_TIERS and info["torchvision"] is None:
            skipped.append(info["build"])
        else:
            memory[info["build"]] = _memory(tier, runs, info["python"])
    result = {
        "params": count_parameters(get_model(tier)),
        "train_mflops_per_sample": train_mflops_per_sample(tier),
        "opt_in": tier in OPT_IN_TIERS,
        "memory": memory,
        "skipped": skipped,
    }
    if timings:
        result["train_samples_per_s"] = statistics.median(r["train_samples_per_s"] for r in timings)
    return result


def _rounded(m: dict) -> dict:
    row = {
        "params": m["params"],
        "train_mflops_per_sample": round(m["train_mflops_per_sample"], 4),
        "opt_in": m["opt_in"],
    }
    if "train_samples_per_s" in m:
        row["train_samples_per_s"] = round(m["train_samples_per_s"], 1)
    for build, figures in m["memory"].items():
        row[column("train_memory_mb", build)] = round(figures["train_memory_mb"], 2)
    return row


def write_catalogue(path: Path, measured: dict[str, dict], runtime_mb: dict[str, float], torch_versions: dict[str, str],
                    date: str, timing: dict[str, str] | None) -> dict:
    """Rewrite the measured columns; rows of tiers not measured this time, columns of a build not
    measured this time and keys this script does not write are kept, rows of tiers no longer
    registered are dropped. `runtime_mb` and `torch_versions` map the builds measured ("cuda", "cpu");
    `timing` holds machine, measured and timed_with when throughput was timed now (None: kept)."""
    import yaml

    old = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    old_tiers = old.get("tiers") or {}
    hint = ("run without --tiers, with --python naming an interpreter of the other torch build "
            "(e.g. a venv with the CPU-only torch: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    tiers = {}
    for tier in list_tiers():
        row = dict(old_tiers.get(tier) or {})
        if tier in measured:
            row.update(_rounded(measured[tier]))
            for build in measured[tier]["skipped"]:  # an older figure, from a venv that had torchvision, stays
                row.setdefault(column("train_memory_mb", build), None)
        row["opt_in"] = tier in OPT_IN_TIERS
        missing = [k for k in MEASURED if k not in row]
        if missing:
            raise RuntimeError(f"tier {tier} has no {', '.join(missing)}: neither measured now nor in {path}; {hint}")
        tiers[tier] = {**{k: row[k] for k in (*MEASURED, "opt_in")}, **row}
    top = {"reference_tier": REFERENCE_TIER, "batch_size": BATCH_SIZE}
    for name in ("runtime_memory_mb", "torch"):
        for build in BUILDS:
            key = column(name, build)
            if name == "runtime_memory_mb" and build in runtime_mb:
                top[key] = round(runtime_mb[build], 1)
            elif name == "torch" and build in torch_versions:
                top[key] = torch_versions[build]
            elif key in old:
                top[key] = old[key]
            else:
                raise RuntimeError(f"{path} has no {key} and this run did not measure the {BUILD_NAMES[build]}; {hint}")
    top["memory_measured"] = date
    # A catalogue from before the two builds timed with the build its `torch` names.
    kept = {"machine": old.get("machine"), "measured": old.get("measured"), "timed_with": old.get("timed_with",
                                                                                                 old.get("torch"))}
    top.update(timing or kept)
    data = {**top, **{k: v for k, v in old.items() if k not in top and k != "tiers"}, "tiers": tiers}
    path.write_text(HEADER + yaml.safe_dump(data, sort_keys=False, width=120))
    return data


def check_completable(path: Path, tiers: list[str], builds: list[str], timed: bool) -> None:
    """Fail before minutes of measuring when `write_catalogue` could not complete the catalogue: the
    rows not measured now, the columns of a build not measured now and (untimed) the throughput must
    be in the old file."""
    import yaml

    old = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    absent = [b for b in BUILDS if b not in builds]
    missing = [column(k, b) for b in absent for k in ("runtime_memory_mb", "torch") if column(k, b) not in old]
    if not timed:
        missing += [k for k in ("machine", "measured") if k not in old]
    for tier in list_tiers():
        row = (old.get("tiers") or {}).get(tier) or {}
        wanted = [column("train_memory_mb", b) for b in absent] if tier in tiers else list(MEASURED)
        if not timed and tier in tiers:
            wanted.append("train_samples_per_s")
        missing += [f"{tier}.{k}" for k in wanted if k not in row]
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(missing)}, which this run would not measure; run without --tiers "
                         "or --memory-only, with --python naming an interpreter of the other torch build "
                         "(CUDA or CPU-only)")


def flops_predicted_samples_per_s(measured: dict[str, dict], tier: str) -> float:
    """What a device would predict for `tier` from the reference tier's measured speed and the
    FLOPs ratio (gefl/tiers/devices.py's estimate), to set beside what `tier` really does here."""
    ref = measured[REFERENCE_TIER]
    return ref["train_samples_per_s"] * ref["train_mflops_per_sample"] / measured[tier]["train_mflops_per_sample"]


def _memory_cell(m: dict, build: str, key: str = "train_memory_mb") -> str:
    figures = m["memory"].get(build)
    if figures is None:
        return "not measured (no torchvision)" if build in m["skipped"] else "-"
    if key != "train_memory_mb":
        return f"{figures[key]:,.0f}"
    memory = [r["train_memory_mb"] for r in figures["runs"]]
    return f"{figures['train_memory_mb']:.1f} ({min(memory):.1f}-{max(memory):.1f})"


def write_results(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    tiers, builds = result["tiers"], result["builds"]
    main = result["interpreters"][0]
    lines = [
        f"# Tier catalogue ({result['date']}, {result['machine']})",
        "",
        f"Training at batch {BATCH_SIZE} on 1x32x32 inputs, 1 thread; written by `python benchmarks/tiers.py "
        "--python CPU-VENV/bin/python`, which also rewrites configs/tiers.yaml (columns explained in its header). "
        + (f"Throughput is timed with torch {main['torch']} only; " if result["timed"] else
           f"Throughput is not re-timed in this run (--memory-only): samples/s are the catalogue's, timed "
           f"{result['timing']['measured']} with torch {result['timing']['timed_with']}; ")
        + "memory is measured with each build. "
        "Runtime memory: RSS of Python + torch + gefl.tiers.models + gefl.optim, before any model. "
        f"Train memory: peak anonymous memory (RssAnon) above that, median of {result['runs']} fresh processes "
        "(min-max in brackets). Peak RSS: the whole measuring process's VmHWM (import and library pages "
        "included), median. The policy charges runtime + train memory of the device's build (CUDA build if "
        "the device has CUDA, else CPU build).",
        "",
        "| build | torch | runtime memory MB | environment on disk MB (du of the venv) |",
        "|---|---|---|---|",
    ]
    for info in result["interpreters"]:
        lines.append(f"| {BUILD_NAMES[info['build']]} | {info['torch']} | "
                     f"{result['runtime_memory_mb'].get(info['build'], float('nan')):.1f} | "
                     f"{info['environment_mb']:,.0f} |")
    lines += [
        "",
        "Effective GFLOP/s = MFLOPs/sample x samples/s. FLOPs-predicted = the reference tier's measured "
        "samples/s scaled by the FLOPs ratio; predicted / measured > 1 means that estimate is optimistic."
        if REFERENCE_TIER in tiers else "",
        "",
        "| tier | params | MFLOPs/sample | samples/s | "
        + " | ".join(f"train memory MB, {BUILD_NAMES[b]}" for b in builds) + " | "
        + " | ".join(f"peak RSS MB, {BUILD_NAMES[b]}" for b in builds)
        + " | effective GFLOP/s | FLOPs-predicted samples/s | predicted / measured | opt-in |",
        "|---|---|---|---|" + "---|" * (2 * len(builds)) + "---|---|---|---|",
    ]
    for tier, m in tiers.items():
        predicted = flops_predicted_samples_per_s(tiers, tier) if REFERENCE_TIER in tiers else None
        lines.append(
            f"| {tier} | {m['params']:,} | {m['train_mflops_per_sample']:.2f} | {m['train_samples_per_s']:,.0f} | "
            + " | ".join(_memory_cell(m, b) for b in builds) + " | "
            + " | ".join(_memory_cell(m, b, "peak_rss_mb") for b in builds) + " | "
            + f"{m['train_mflops_per_sample'] * m['train_samples_per_s'] / 1e3:.2f} | "
            + (f"{predicted:,.0f} | {predicted / m['train_samples_per_s']:.2f} | " if predicted else "- | - | ")
            + f"{'yes' if m['opt_in'] else ''} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", nargs="+", default=None, help="tiers to measure (default: all registered)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per tier (median kept)")
    parser.add_argument("--python", metavar="PATH", default=None,
                        help="a second interpreter, of the other torch build (typically a venv with the CPU-only "
                             "torch), to measure memory under as well (untimed); its build picks the columns")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure memory only and keep the catalogue's train_samples_per_s (timing needs a "
                             "quiet machine; memory figures do not depend on the load)")
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
    interpreters = [describe_interpreter(sys.executable)]
    if args.python:
        interpreters.append(describe_interpreter(args.python))
        if interpreters[1]["build"] == interpreters[0]["build"]:
            parser.error(f"--python {args.python} runs the same torch build as this interpreter "
                         f"({BUILD_NAMES[interpreters[0]['build']]}); name one of the other build")
    for info in interpreters:
        print(f"{BUILD_NAMES[info['build']]}: torch {info['torch']} under {info['python']} "
              f"(torchvision {info['torchvision'] or 'not importable'}; {info['environment_mb']:,.0f} MB on disk)",
              flush=True)
    builds = [info["build"] for info in interpreters]
    timed = not args.memory_only
    check_completable(Path(args.catalogue), tiers, builds, timed)
    measured = {}
    for tier in tiers:
        measured[tier] = m = measure_tier(tier, args.runs, interpreters, timed)
        memory = "  ".join(f"{m['memory'][b]['train_memory_mb']:>6.1f} MB {b}" if b in m["memory"]
                           else f"{'-':>6} MB {b}" for b in builds)
        print(f"{tier:<20} {m['params']:>11,} params  {m['train_mflops_per_sample']:>9.2f} MFLOPs/sample  "
              f"{memory}" + (f"  {m['train_samples_per_s']:>8.0f} samples/s" if timed else ""), flush=True)
    runtime = {b: statistics.median(r["runtime_memory_mb"] for m in measured.values() if b in m["memory"]
                                    for r in m["memory"][b]["runs"]) for b in builds}
    torch_versions = {info["build"]: f"{info['torch']} ({BUILD_NAMES[info['build']]}"
                      + (f", CUDA {info['cuda']})" if info["cuda"] else ")") for info in interpreters}
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    date = time.strftime("%Y-%m-%d")
    timing = {"machine": machine, "measured": date, "timed_with": torch_versions[builds[0]]} if timed else None
    written = write_catalogue(Path(args.catalogue), measured, runtime, torch_versions, date, timing)
    for tier, m in measured.items():  # untimed: the catalogue's throughput, for the table
        m.setdefault("train_samples_per_s", written["tiers"][tier]["train_samples_per_s"])
    if REFERENCE_TIER in measured:
        for tier, m in measured.items():
            m["flops_predicted_samples_per_s"] = flops_predicted_samples_per_s(measured, tier)
    for m in measured.values():  # the catalogue's columns, flat, beside the per-build detail
        m.update({k: v for k, v in _rounded(m).items() if k.startswith("train_memory_mb")})
    result = {"date": date, "machine": machine, "cores": os.cpu_count(), "interpreters": interpreters, "timed": timed,
              "timing": {k: written[k] for k in ("machine", "measured", "timed_with")},
              "builds": builds, "runtime_memory_mb": runtime, "runs": args.runs, "batch_size": BATCH_SIZE,
              "torchvision_tiers": list(TORCHVISION_TIERS), "tiers": measured}
    write_results(Path(args.out), result)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
