"""`gefl export`: a run's tiers as ONNX files that provably compute what the PyTorch model computes.

Each tier's whole network (FE + head) is exported with a dynamic batch axis and the metadata
inference needs (export.metadata). The fp32 file must match PyTorch on real test images (max
absolute logit difference < 1e-4 and the same top-1) or the export fails; int8 files are
measured, not trusted: every file's accuracy on the whole test set goes into the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from gefl.export.infer import open_session
from gefl.export.metadata import INPUT_NAME, OUTPUT_NAME, ModelInfo
from gefl.export.quantize import QUANTIZE_MODES, quantize

from gefl.data import MEAN, STD, Dataset, load_dataset
from gefl.errors import GeflError
from gefl.rounds.rundir import load_tier, run_tiers
from gefl.tiers.models import TierNet

log = logging.getLogger(__name__)

PARITY_IMAGES = 256
PARITY_TOLERANCE = 1e-4
CALIBRATION_IMAGES = 256
OPSET = 18
EVAL_BATCH = 500
INT8_SIZE_TARGET = 0.35
"""An int8 file above this fraction of its fp32 file gets a note in the report saying why."""


def export_onnx(model: TierNet, info: ModelInfo, path: Path) -> None:
    """Write `model` as a self-contained ONNX file (weights inside) with a dynamic batch axis."""
    example = torch.zeros(2, info.channels, info.input_size, info.input_size)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET, verbose=False,
    )
    proto = program.model_proto
    strip_debug_info(proto)
    set_metadata(proto, info)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop what only a debugger reads: the exporter's per-node stack traces (which carry this
    machine's absolute paths into a file shipped to devices), doc strings, shape annotations
    that onnxruntime recomputes, and opset domains no node uses."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.metadata_props[:]
    del graph.value_info[:]
    proto.doc_string = graph.doc_string = ""
    used = {node.domain for node in graph.node} | {""}
    keep = [opset for opset in proto.opset_import if opset.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> None:
    del proto.metadata_props[:]
    for key, value in info.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "gefl-edge"


def logits_of(sess: ort.InferenceSession, images: torch.Tensor, batch: int = EVAL_BATCH) -> np.ndarray:
    return np.concatenate([sess.run(None, {INPUT_NAME: images[i:i + batch].numpy()})[0]
                           for i in range(0, len(images), batch)])


def parity(sess: ort.InferenceSession, model: TierNet, images: torch.Tensor) -> dict:
    with torch.inference_mode():
        expected = model(images).numpy()
    got = logits_of(sess, images)
    return {"images": len(images), "max_abs_logit_diff": float(np.abs(got - expected).max()),
            "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean())}


def accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    return round(100.0 * float((logits.argmax(1) == labels.numpy()).mean()), 2)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    tiers: Sequence[str] | None = None,
    quantize_mode: str = "static",
    data_dir: str | Path | None = None,
) -> dict:
    """Export, verify and measure each tier of a run; write and return DIR/export_report.json."""
    run_dir, out = Path(run_dir), Path(out)
    if quantize_mode not in QUANTIZE_MODES:
        raise GeflError(f"unknown --quantize {quantize_mode!r}; valid modes are: {', '.join(QUANTIZE_MODES)}")
    if not (run_dir / "config.yaml").is_file():
        raise GeflError(f"{run_dir} is not a run directory (no config.yaml); give the directory that "
                        "`gefl simulate` wrote, e.g. runs/quickstart-20261126-101500")
    available = run_tiers(run_dir)
    tiers = available if not tiers else list(tiers)
    for tier in tiers:
        if tier not in available:
            raise GeflError(f"run {run_dir} has no tier {tier!r}; its tiers are: {', '.join(available)}")
    out.mkdir(parents=True, exist_ok=True)
    dataset = _run_dataset(run_dir, data_dir)
    generator = torch.Generator().manual_seed(0)
    calibration = dataset.train.images[torch.randperm(len(dataset.train), generator=generator)[:CALIBRATION_IMAGES]]
    report: dict = {
        "run_dir": str(run_dir), "run_id": run_dir.resolve().name, "dataset": dataset.name,
        "quantize": quantize_mode, "test_images": len(dataset.test), "parity_images": PARITY_IMAGES,
        "calibration_images": len(calibration) if quantize_mode == "static" else 0, "tiers": {},
    }
    failures = []
    for tier in tiers:
        started = time.perf_counter()
        model, meta = load_tier(run_dir, tier)
        if meta["dataset"] != dataset.name:
            raise GeflError(f"weights of {tier} were trained on {meta['dataset']}, the run's config names "
                            f"{dataset.name}")
        entry = _export_tier(model, tier, dataset, report["run_id"], out, quantize_mode, calibration.numpy())
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report["tiers"][tier] = entry
        log.info(format_tier(tier, entry))
        if not entry["fp32"]["parity_ok"]:
            failures.append(tier)
    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(f"report: {out / 'export_report.json'}")
    if failures:
        raise GeflError(f"the ONNX file of {', '.join(failures)} does not compute what the PyTorch model computes "
                        f"(max |logit difference| >= {PARITY_TOLERANCE} or top-1 disagreement); see the report")
    return report


def _run_dataset(run_dir: Path, data_dir: str | Path | None) -> Dataset:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    name = config.get("dataset", "fashion-mnist")
    return load_dataset(name, data_dir if data_dir is not None else config.get("data_dir"))


def _export_tier(model: TierNet, tier: str, dataset: Dataset, run_id: str, out: Path, quantize_mode: str,
                 calibration: np.ndarray) -> dict:
    channels = dataset.in_channels
    info = ModelInfo(
        tier=tier, classes=dataset.classes, channels=channels, input_size=int(dataset.test.images.shape[-1]),
        source_size=dataset.source_size, mean=[MEAN] * channels, std=[STD] * channels, dataset=dataset.name,
        run_id=run_id, precision="fp32",
    )
    fp32_path = out / f"{tier}.onnx"
    export_onnx(model, info, fp32_path)
    sess = open_session(fp32_path)
    check = parity(sess, model, dataset.test.images[:PARITY_IMAGES])
    check["parity_ok"] = check["max_abs_logit_diff"] < PARITY_TOLERANCE and check["top1_agreement"] == 1.0
    with torch.inference_mode():
        torch_logits = torch.cat([model(dataset.test.images[i:i + EVAL_BATCH])
                                  for i in range(0, len(dataset.test), EVAL_BATCH)]).numpy()
    fp32_logits = logits_of(sess, dataset.test.images)
    entry: dict = {
        "params": sum(p.numel() for p in model.parameters()),
        "torch_accuracy": accuracy(torch_logits, dataset.test.labels),
        "fp32": {"file": fp32_path.name, "bytes": fp32_path.stat().st_size,
                 "accuracy": accuracy(fp32_logits, dataset.test.labels), **check},
    }
    if quantize_mode == "none":
        return entry
    int8_path = out / f"{tier}.int8.onnx"
    try:
        quantize(fp32_path, int8_path, quantize_mode, calibration)
        proto = onnx.load(str(int8_path))
        strip_debug_info(proto)
        set_metadata(proto, dataclasses.replace(info, precision="int8"))
        onnx.save_model(proto, str(int8_path))
        int8_logits = logits_of(open_session(int8_path), dataset.test.images)
    except Exception as exc:  # the quantizer's failures are many and untyped; the fp32 file stands regardless
        int8_path.unlink(missing_ok=True)
        entry["int8"] = {"skipped": f"{quantize_mode} quantization does not apply: {type(exc).__name__}: {exc}"}
        return entry
    size = int8_path.stat().st_size
    int8_acc = accuracy(int8_logits, dataset.test.labels)
    entry["int8"] = {
        "file": int8_path.name, "mode": quantize_mode, "bytes": size,
        "size_ratio": round(size / entry["fp32"]["bytes"], 3), "accuracy": int8_acc,
        "accuracy_drop": round(entry["fp32"]["accuracy"] - int8_acc, 2),
        "top1_agreement_with_fp32": round(float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()), 4),
    }
    if entry["int8"]["size_ratio"] > INT8_SIZE_TARGET:
        fixed = size - entry["params"]  # int8 stores one byte per weight; the rest does not shrink
        entry["int8"]["size_note"] = (
            f"{100 * entry['int8']['size_ratio']:.0f}% of the fp32 file, above {100 * INT8_SIZE_TARGET:.0f}%: "
            f"int8 shrinks the {entry['params']:,} weights 4x, but the rest of the file (graph, Q/DQ nodes, "
            f"scales, int32 biases: {fixed / 1024:.1f} KiB) does not shrink, and in a model this small it dominates")
    return entry


def format_tier(tier: str, entry: dict) -> str:
    fp32 = entry["fp32"]
    line = (f"{tier:<8} fp32 {fp32['bytes'] / 1024:7.1f} KiB  acc {fp32['accuracy']:6.2f}  "
            f"parity max|diff| {fp32['max_abs_logit_diff']:.1e} top-1 {100 * fp32['top1_agreement']:.0f}%")
    int8 = entry.get("int8")
    if int8 is None:
        return line
    if "skipped" in int8:
        return f"{line}\n{'':<8} int8 skipped: {int8['skipped']}"
    return (f"{line}\n{'':<8} int8 {int8['bytes'] / 1024:7.1f} KiB  acc {int8['accuracy']:6.2f}  "
            f"({100 * int8['size_ratio']:.0f}% of fp32 size, {int8['accuracy_drop']:+.2f} points lost)"
            + (f"\n{'':<8} note: {int8['size_note']}" if "size_note" in int8 else ""))
