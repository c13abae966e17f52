"""Classify images with an exported model, with onnxruntime, numpy and pillow only.

This module must never import torch or torchvision (a test runs it in a virtualenv that has
neither): it is what runs on a board that only does inference. The preprocessing reproduces
`gefl.data.to_tensor` from the model's metadata: scale to [0, 1], bilinear resize in floating
point (PIL's filter is the antialiased one torch's `interpolate(antialias=True)` was ported
from), clamp, then (x - mean) / std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from gefl.export.metadata import INPUT_NAME, ModelInfo
from PIL import Image

from gefl.errors import GeflError
from gefl.image_folder import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
BATCH_SIZE = 64


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]
    """(class name, probability), most likely first."""


def open_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session, with a message that says what is wrong when the file is not a model."""
    path = Path(path)
    if not path.is_file():
        raise GeflError(f"model file {path} does not exist")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types for a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GeflError(f"{path} is not an ONNX model onnxruntime can load ({reason[:200]})") from None


class Classifier:
    """An exported tier plus the preprocessing its metadata names."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        self.info = ModelInfo.from_props(self.session.get_modelmeta().custom_metadata_map, self.path)

    def preprocess(self, image: Image.Image, name: str | Path = "image") -> np.ndarray:
        """(C, H, W) float32 in the training range, or a GeflError saying why the image does not fit."""
        info = self.info
        if image.mode != info.mode:
            kind = "grayscale" if info.mode == "L" else "RGB colour"
            raise GeflError(f"{name}: image mode is {image.mode}, but this model ({info.dataset}, {info.channels} "
                            f"channel{'s' if info.channels > 1 else ''}) takes {kind} images (mode {info.mode}); "
                            f"convert it first, e.g. Image.open(path).convert({info.mode!r})")
        allowed = {tuple(info.source_size), (info.input_size, info.input_size)}
        if (image.height, image.width) not in allowed:
            sizes = " or ".join(f"{w}x{h}" for h, w in sorted(allowed))
            raise GeflError(f"{name}: image is {image.width}x{image.height} pixels; this model takes {sizes} "
                            f"images ({info.dataset})")
        side = info.input_size
        planes = []
        for band in image.split():
            plane = band.convert("F")
            if plane.size != (side, side):
                plane = plane.resize((side, side), Image.Resampling.BILINEAR)
            planes.append(np.asarray(plane, dtype=np.float32) / 255.0)
        x = np.clip(np.stack(planes), 0.0, 1.0)
        mean = np.asarray(info.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(info.std, dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def classify(self, paths: Sequence[Path], top: int = 1, batch_size: int = BATCH_SIZE) -> list[Prediction]:
        top = max(1, min(top, len(self.info.classes)))
        out: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            batch = np.stack([self.preprocess(load_image(p), p) for p in chunk])
            for path, probs in zip(chunk, self.probabilities(batch)):
                order = np.argsort(-probs)[:top]
                out.append(Prediction(path, [(self.info.classes[i], float(probs[i])) for i in order]))
        return out


def load_image(path: Path) -> Image.Image:
    """The image at `path`, read as a client's training images are (gefl.image_folder.open_image):
    only image formats, a size cap before decoding, any decoder failure as an error naming the file."""
    return open_image(path)


def collect_images(target: str | Path) -> list[Path]:
    """One file, or every image file directly inside a directory, in name order."""
    target = Path(target)
    if target.is_dir():
        images = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise GeflError(f"no images in directory {target} (looked for {', '.join(IMAGE_SUFFIXES)})")
        return images
    if not target.exists():
        raise GeflError(f"{target} does not exist: give an image file or a directory of images")
    return [target]


def format_predictions(predictions: Sequence[Prediction]) -> str:
    return "\n".join(f"{p.path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in p.top) for p in predictions)


def run(model: str | Path, target: str | Path, top: int = 1, threads: int | None = None) -> list[Prediction]:
    """What `gefl infer` does: load, classify, print."""
    classifier = Classifier(model, threads)
    predictions = classifier.classify(collect_images(target), top=top)
    print(format_predictions(predictions))
    return predictions
