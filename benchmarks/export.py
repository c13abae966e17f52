"""What deployment costs, per tier: latency of torch eager vs onnxruntime fp32 vs onnxruntime int8,
file sizes, accuracy on the whole test set, and the resident memory of a `gefl infer` process.

Trains the quickstart run (or takes --run-dir), exports every tier with `gefl export`'s code
(static int8 QDQ), then times the three engines on the same inputs, interleaved so that they
share whatever else the machine is doing, with the same thread count. Reports medians. Writes
benchmarks/results/export.json and .md.

    python benchmarks/export.py [--run-dir RUN] [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from gefl.export.infer import open_session
from gefl.export.onnx_export import export_run, load_tier
from PIL import Image

from gefl.config import load_config
from gefl.data import read_idx
from gefl.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
CALLS = {1: 200, 64: 20}
"""Calls per timed block: a block lasts a few tens of milliseconds, long enough for the clock."""


def engines(model: torch.nn.Module, fp32: ort.InferenceSession, int8: ort.InferenceSession,
            x: np.ndarray) -> dict[str, Callable[[], object]]:
    xt = torch.from_numpy(x)

    def eager() -> object:
        with torch.inference_mode():
            return model(xt)

    return {"torch": eager, "ort_fp32": lambda: fp32.run(None, {"images": x}),
            "ort_int8": lambda: int8.run(None, {"images": x})}


def time_engines(engines: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, dict]:
    """Median and p90 milliseconds per call; blocks interleaved across engines, after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for fn in engines.values():
        for _ in range(max(5, calls // 4)):
            fn()
    for _ in range(repeats):
        for name, fn in engines.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append(1000 * (time.perf_counter() - start) / calls)
    return {name: {"median_ms": round(statistics.median(v), 4),
                   "p90_ms": round(sorted(v)[int(0.9 * (len(v) - 1))], 4)} for name, v in samples.items()}


def infer_peak_rss_mb(model: Path, image: Path, runs: int = 5) -> float:
    """Median peak RSS of a fresh `gefl infer` process classifying one image."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peaks = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "gefl.cli", "infer", str(model),
                              str(image)], capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip()) / 1024)
    return round(statistics.median(peaks), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a trained run (default: train the quickstart config first)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime alike")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per engine and batch size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
        if not args.run_dir:
            print("training the quickstart run to export (a few minutes)")
            simulate(load_config(ROOT / "configs" / "quickstart.yaml"), out=run_dir)
        report = export_run(run_dir, tmp / "onnx", quantize_mode="static")
        rng = np.random.default_rng(0)
        inputs = {b: rng.standard_normal((b, 1, 32, 32)).astype(np.float32) for b in CALLS}
        tiers = {}
        for tier, entry in report["tiers"].items():
            model, _ = load_tier(run_dir, tier)
            fp32 = open_session(tmp / "onnx" / entry["fp32"]["file"], args.threads)
            int8 = open_session(tmp / "onnx" / entry["int8"]["file"], args.threads)
            latency = {}
            for batch, calls in CALLS.items():
                latency[batch] = time_engines(engines(model, fp32, int8, inputs[batch]), calls, args.repeats)
            speedup = latency[1]["torch"]["median_ms"] / latency[1]["ort_fp32"]["median_ms"]
            tiers[tier] = {**entry, "latency": latency, "ort_fp32_speedup_b1": round(speedup, 2)}
            print(f"{tier:<6} batch 1: torch {latency[1]['torch']['median_ms']:.3f} ms, ort fp32 "
                  f"{latency[1]['ort_fp32']['median_ms']:.3f} ms ({speedup:.1f}x), int8 "
                  f"{latency[1]['ort_int8']['median_ms']:.3f} ms")
        image = tmp / "image.png"
        Image.fromarray(read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))[0]).save(image)
        largest = max(tiers, key=lambda t: tiers[t]["params"])
        rss = {p: infer_peak_rss_mb(tmp / "onnx" / tiers[largest][p]["file"], image) for p in ("fp32", "int8")}
    result = {
        "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "repeats": args.repeats, "calls": CALLS,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "run_dir": str(run_dir),
        "test_images": report["test_images"], "tiers": tiers,
        "infer_peak_rss_mb": {"tier": largest, **rss},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"# Export: torch eager vs onnxruntime ({r['date']}, torch {r['torch']}, onnxruntime {r['onnxruntime']})", "",
        f"{r['threads']} thread(s) for every engine; median ms per call over {r['repeats']} interleaved blocks of "
        f"{r['calls'][1]} calls (batch 1) or {r['calls'][64]} calls (batch 64). Accuracy on the "
        f"{r['test_images']} test images; int8 is static QDQ calibrated on 256 training images.", "",
        "| tier | params | torch b1 ms | ort fp32 b1 ms | speed-up | ort int8 b1 ms | torch b64 ms | "
        "ort fp32 b64 ms | ort int8 b64 ms | fp32 KiB | int8 KiB | int8/fp32 | acc torch | acc fp32 | acc int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tier, t in r["tiers"].items():
        b1, b64 = t["latency"][1], t["latency"][64]
        lines.append(
            f"| {tier} | {t['params']:,} | {b1['torch']['median_ms']:.3f} | {b1['ort_fp32']['median_ms']:.3f} | "
            f"{t['ort_fp32_speedup_b1']:.1f}x | {b1['ort_int8']['median_ms']:.3f} | {b64['torch']['median_ms']:.2f} | "
            f"{b64['ort_fp32']['median_ms']:.2f} | {b64['ort_int8']['median_ms']:.2f} | "
            f"{t['fp32']['bytes'] / 1024:.1f} | {t['int8']['bytes'] / 1024:.1f} | "
            f"{100 * t['int8']['size_ratio']:.0f}% | "
            f"{t['torch_accuracy']:.2f} | {t['fp32']['accuracy']:.2f} | {t['int8']['accuracy']:.2f} |")
    notes = [f"- {tier}: {t['int8']['size_note']}" for tier, t in r["tiers"].items() if "size_note" in t["int8"]]
    if notes:
        lines += ["", "int8 files above 35 % of fp32:", *notes]
    rss = r["infer_peak_rss_mb"]
    lines += ["", f"`gefl infer` classifying one image with {rss['tier']}: peak resident memory "
              f"{rss['fp32']} MB (fp32), {rss['int8']} MB (int8), median of 5 fresh processes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
