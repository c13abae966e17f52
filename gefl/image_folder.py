"""Client data as torchvision ImageFolder directories: one sub-folder per class, one file per image.

A real edge client holds its own images on disk rather than a slice of a tensor in the simulator's
memory. `write_split` turns a registered dataset into one such directory per client, split exactly
as `gefl simulate` splits it for the same dataset, partition and seed, so a deployed federation can
be compared image for image with a simulated one. `read_image_folder` reads any directory in that
layout back with pillow and numpy only (it is also what a board without torch can use), and
`load_client_split` turns it into the training tensors a client trains on.

Two conventions keep labels meaningful across clients. Every class gets a folder in every client
directory, empty or not: ImageFolder numbers classes by sorted folder name, so a client missing a
class under a non-IID split would otherwise shift every later label. And folders are named
"<index>-<slug>" with a zero-padded index, so name order is class order whatever the class names.
Note that torchvision's own ImageFolder needs `allow_empty=True` to accept the empty class
folders, and its default loader converts grayscale images to RGB.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gefl.errors import GeflError, unknown_name

if TYPE_CHECKING:  # gefl.data imports torch; this module must stay importable without it
    from gefl.data import Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"
_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def class_dir_name(index: int, name: str) -> str:
    """'T-shirt/top' at index 0 -> '00-t-shirt-top': sorts in class order and is safe on any filesystem."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"
    return f"{index:02d}-{slug}"


def client_dir_name(client: int) -> str:
    return f"client-{client:03d}"


def write_split(
    dataset: str,
    num_clients: int,
    out: Path,
    *,
    kind: str = "iid",
    samples_per_client: int | None = 600,
    alpha: float = 0.3,
    shards_per_client: int = 2,
    seed: int = 0,
    data_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Write each client's share of `dataset`'s training set as out/client-NNN/ in ImageFolder layout.

    The split is `gefl.data.partition` called exactly as `gefl simulate` calls it, so client k's
    images here are client k's images in a simulation with the same dataset, partition and seed.
    Images are PNGs of the original uint8 pixels (e.g. 28x28 for Fashion-MNIST; the resize to
    32x32 happens when they are loaded for training), named by their index in the training set.
    Returns the manifest, which is also written to out/manifest.json.
    """
    from gefl.data import PARTITIONS, load_raw, partition

    say = progress or (lambda _msg: None)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a directory that is not empty"
        raise GeflError(f"{out} is {what}; give --out a new or empty directory so no existing files get mixed in")
    if kind not in PARTITIONS:
        raise unknown_name("partition", kind, PARTITIONS)
    if samples_per_client is not None and samples_per_client < 1:
        raise GeflError(f"samples per client must be at least 1 (or all), got {samples_per_client}")
    raw = load_raw(dataset, data_dir)
    channels = raw.train_x.shape[1]
    if channels not in (1, 3):
        raise GeflError(f"dataset {dataset!r} has {channels}-channel images; only 1 (grayscale) or 3 (RGB) "
                        "channels can be written as PNG files")
    parts = partition(raw.train_y, num_clients, kind, samples_per_client=samples_per_client,
                      alpha=alpha, shards_per_client=shards_per_client, seed=seed)
    num_classes = len(raw.classes)
    class_dirs = [class_dir_name(i, name) for i, name in enumerate(raw.classes)]
    if int(raw.train_y.max(initial=0)) >= num_classes or int(raw.train_y.min(initial=0)) < 0:
        raise GeflError(f"dataset {dataset!r} has labels outside 0..{num_classes - 1}; it cannot be written "
                        "as one folder per class")

    say(f"gefl data split: {dataset}, {num_clients} clients, {kind} partition (seed {seed}) -> {out}")
    clients = []
    for client, indices in enumerate(parts):
        client_dir = out / client_dir_name(client)
        for name in class_dirs:
            (client_dir / name).mkdir(parents=True, exist_ok=True)
        labels = raw.train_y[indices]
        for index, label in zip(indices.tolist(), labels.tolist()):
            _to_pil(raw.train_x[index]).save(client_dir / class_dirs[label] / f"{index:05d}.png")
        histogram = np.bincount(labels, minlength=num_classes).tolist()
        clients.append({"client": client, "dir": client_dir.name, "num_samples": len(indices),
                        "label_histogram": histogram})
        present = sum(1 for n in histogram if n)
        say(f"  {client_dir.name}: {len(indices)} images, {present}/{num_classes} classes present")

    manifest = {
        "dataset": dataset,
        "classes": raw.classes,
        "class_dirs": class_dirs,
        "partition": {"kind": kind, "seed": seed, "samples_per_client": samples_per_client,
                      "alpha": alpha, "shards_per_client": shards_per_client},
        "clients": clients,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {sum(c['num_samples'] for c in clients)} images and {out / MANIFEST}")
    return manifest


def _to_pil(image: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> a mode "L" (C=1) or "RGB" (C=3) image at the same size."""
    # pillow infers the mode from the uint8 array's shape: (H, W) -> "L", (H, W, 3) -> "RGB"
    if image.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(image[0], dtype=np.uint8))
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.uint8))


def _class_folders(root: Path) -> list[str]:
    """Sub-directories sorted by name, empty ones included (torchvision's `find_classes`)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _image_files(class_root: Path) -> list[str]:
    """Image files under one class folder, as paths relative to it (searched recursively, like torchvision)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(class_root, followlinks=True):
        for filename in filenames:
            if filename.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(dirpath, filename).relative_to(class_root).as_posix())
    return found


def read_image_folder(path: str | Path, channels: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a directory in ImageFolder layout as (uint8 images (N, C, H, W), int64 labels, class folder names).

    Class folders are the sub-directories sorted by name, including empty ones, and a class's
    label is its position in that order. Samples are ordered by file name across all classes,
    so a directory written by `write_split` reads back in training-set order. `channels` 1 or 3
    converts every image to grayscale ("L") or "RGB"; None gives 1 channel if every image is
    grayscale, else 3. Images keep their size, which must be the same for all of them.
    """
    root = Path(path)
    if not root.exists():
        raise GeflError(f"image folder {root} does not exist; give the directory holding one sub-folder per class "
                        "(e.g. a client directory written by `gefl data split`)")
    if not root.is_dir():
        raise GeflError(f"{root} is not a directory; give the directory holding one sub-folder per class")
    if channels not in (None, 1, 3):
        raise GeflError(f"channels must be 1, 3 or None, got {channels!r}")
    classes = _class_folders(root)
    if not classes:
        loose = [p.name for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise GeflError(f"{root} has no class sub-folders{hint}; put each class's images in a sub-folder of its "
                        f"own: {root}/<class>/<image>.png, one sub-folder per class of the dataset")
    samples = sorted((name, label) for label, cls in enumerate(classes) for name in _image_files(root / cls))
    if not samples:
        raise GeflError(f"{root} has {len(classes)} class folders but no images in any of them (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}); put the images in the class folders")

    arrays: list[np.ndarray] = []
    all_gray = True
    first: tuple[Path, tuple[int, int]] | None = None
    for name, label in samples:
        file = root / classes[label] / name
        try:
            with Image.open(file) as image:
                image.load()
                gray = image.mode in _GRAYSCALE_MODES
                target = {1: "L", 3: "RGB", None: "L" if gray else "RGB"}[channels]
                converted = image.convert(target)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise GeflError(f"{file} is not an image pillow can read ({exc}); replace or delete it") from None
        all_gray &= gray
        if first is None:
            first = (file, converted.size)
        elif converted.size != first[1]:
            (w0, h0), (w1, h1) = first[1], converted.size
            raise GeflError(f"images in {root} differ in size: {file} is {w1}x{h1} but {first[0]} is {w0}x{h0}; "
                            "resize them all to one size")
        array = np.asarray(converted, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))

    if channels is None and not all_gray:  # L -> RGB repeats the one band, as pillow's convert does
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    images = np.ascontiguousarray(np.stack(arrays))
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return images, labels, classes


def load_client_split(path: str | Path, num_classes: int, channels: int) -> Split:
    """A client's image folder as training tensors: float32 (N, C, 32, 32) in [-1, 1] and int64 labels.

    The number of class folders must match the federation's dataset, or labels would mean other classes.
    """
    import torch

    from gefl.data import Split, to_tensor

    images, labels, classes = read_image_folder(path, channels)
    if len(classes) != num_classes:
        raise GeflError(
            f"{path} has {len(classes)} class folders, but the federation's dataset has {num_classes} classes: "
            f"{', '.join(classes)}; make one folder per class, empty ones included, named so that sorting them "
            "gives the dataset's class order (`gefl data split` writes them so)"
        )
    return Split(to_tensor(images), torch.as_tensor(labels, dtype=torch.long))
