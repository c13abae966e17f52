"""int8 versions of an exported fp32 file, with onnxruntime's quantization tools.

Static quantization writes QDQ (QuantizeLinear/DequantizeLinear pairs around int8 weights),
the format onnxruntime's docs recommend first: weights per output channel, activations with
ranges calibrated on real training images. Dynamic quantization needs no calibration but
onnxruntime's CPU ConvInteger takes only uint8 weights, so it covers the linear layers only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from gefl.export.metadata import INPUT_NAME
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

QUANTIZE_MODES = ("none", "dynamic", "static")


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize(fp32_path: Path, out_path: Path, mode: str, calibration: np.ndarray | None = None) -> None:
    """Write the int8 model of `fp32_path` to `out_path` (metadata is the caller's to restore)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        if mode == "static":
            if calibration is None or len(calibration) == 0:
                raise ValueError("static quantization needs calibration images")
            quantize_static(
                str(prepared), str(out_path), _Batches(calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        elif mode == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        else:
            raise ValueError(f"unknown quantization mode {mode!r}; valid modes are {', '.join(QUANTIZE_MODES[1:])}")
