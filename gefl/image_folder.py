"""Client data as torchvision ImageFolder directories: one sub-folder per class, one file per image.

A real edge client holds its own images on disk rather than a slice of a tensor in the simulator's
memory. `write_split` turns a registered dataset into one such directory per client, split exactly
as `gefl simulate` splits it for the same dataset, partition and seed, so a deployed federation can
be compared image for image with a simulated one. `read_image_folder` reads any directory in that
layout back with pillow and numpy only (it is also what a board without torch can use), and
`load_client_split` turns it into the training tensors a client trains on.

Two conventions keep labels meaningful across clients. Every class gets a folder in every client
directory, empty or not, so a client missing a class under a non-IID split cannot shift every later
label. And folders are named "<index>-<slug>" with a zero-padded index: `read_image_folder` takes
each label from that index (and refuses gaps and repeats), and up to 100 classes name order is
class order too, as torchvision's ImageFolder, which numbers classes by sorted folder name, needs
("100-" sorts between "10-" and "11-"). Note that torchvision's own ImageFolder needs
`allow_empty=True` to accept the empty class folders, and its default loader converts grayscale
images to RGB.

A client's data directory is read as untrusted input: what it holds is what the client trains on
and registers with, so `read_image_folder` follows no link to a directory, none out of the
directory, counts each file once and decodes only the image formats of IMAGE_SUFFIXES, up to
MAX_IMAGE_PIXELS; anything else is a GeflError naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gefl.errors import GeflError, unknown_name

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # gefl.data imports torch; this module must stay importable without it
    from gefl.data import Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
"""The pillow formats of IMAGE_SUFFIXES: the only ones a data directory's files are decoded as."""
MAX_IMAGE_PIXELS = 1024 * 1024
"""Largest image accepted (width x height): a thousand times the 32x32 every image is resized to
for training, and more than any registered dataset's images (28x28, 32x32), yet small enough that
one image cannot exhaust a board's memory."""
MAX_CLASSES = 100_000
"""As many classes as the aggregator accepts in a label histogram (gefl.aggregator.coordinator)."""
_CLASS_DIR = re.compile(r"([0-9]{1,6})-([A-Za-z0-9][A-Za-z0-9_-]*)")
"""A class folder's name, `class_dir_name`'s format: the index (ASCII digits: int() would also take
other scripts' digits) and a name of letters, digits, '-' and '_' (nothing a path could misread)."""
MANIFEST = "manifest.json"
_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def class_dir_name(index: int, name: str) -> str:
    """'T-shirt/top' at index 0 -> '00-t-shirt-top': the index first (it is the label `read_image_folder`
    gives), in class order by name up to 100 classes, and safe on any filesystem."""
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
) -> dict:
    """Write each client's share of `dataset`'s training set as out/client-NNN/ in ImageFolder layout.

    The split is `gefl.data.partition` called exactly as `gefl simulate` calls it, so client k's
    images here are client k's images in a simulation with the same dataset, partition and seed.
    Images are PNGs of the original uint8 pixels (e.g. 28x28 for Fashion-MNIST; the resize to
    32x32 happens when they are loaded for training), named by their index in the training set.
    Returns the manifest, which is also written to out/manifest.json.
    """
    from gefl.data import PARTITIONS, load_raw, partition

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

    log.info(f"gefl data split: {dataset}, {num_clients} clients, {kind} partition (seed {seed}) -> {out}")
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
        log.info(f"  {client_dir.name}: {len(indices)} images, {present}/{num_classes} classes present")

    manifest = {
        "dataset": dataset,
        "classes": raw.classes,
        "class_dirs": class_dirs,
        "partition": {"kind": kind, "seed": seed, "samples_per_client": samples_per_client,
                      "alpha": alpha, "shards_per_client": shards_per_client},
        "clients": clients,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info(f"wrote {sum(c['num_samples'] for c in clients)} images and {out / MANIFEST}")
    return manifest


def _to_pil(image: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> a mode "L" (C=1) or "RGB" (C=3) image at the same size."""
    # pillow infers the mode from the uint8 array's shape: (H, W) -> "L", (H, W, 3) -> "RGB"
    if image.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(image[0], dtype=np.uint8))
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.uint8))


FileKey = tuple[int, int]
"""(st_dev, st_ino): one file, whatever the paths (links) that lead to it."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _check_link(link: str, root: str) -> str:
    """Where the symbolic link `link` leads (resolved); refuses a link to a directory, anywhere
    under the data directory, and a link that leads out of it.

    Links to directories are never followed: one back up the tree (`loop -> ..`) would list the
    class's images again under every name the loop can spell (a 600-image client read 24,600, two
    such links never finish), and any other one lists images that are already counted under their
    own folder, or lie outside the data directory. Links that lead out of the data directory are
    refused rather than skipped with a warning: the client trains on, and reports the sample count
    of, exactly what this function returns, a skipped image would change both silently (a
    warning in a service's journal is rarely read), and the refusal comes before any network
    traffic, with the link named, so the fix is plain: copy the file in or delete the link. A link
    to a file inside the data directory is read (once: see `_class_images`).
    """
    target = os.path.realpath(link)
    if os.path.isdir(target):
        where = "into" if _inside(target, root) else "out of the data directory, to"
        raise GeflError(f"{link} is a symbolic link to a directory ({where} {target}); links to directories are "
                        "not followed (they can loop or count images twice): replace the link with the folder's "
                        "files or delete it")
    if not _inside(target, root):
        raise GeflError(f"{link} is a symbolic link that leads out of the data directory {root}, to {target}; "
                        "copy the file into the data directory or delete the link")
    return target


def _class_folders(root: Path) -> list[str]:
    """The class folders (direct sub-directories of `root`), in label order: a folder's label is
    the number it starts with, so folders named `NN-name` by `write_split` (`class_dir_name`)
    keep their labels whatever their count (by name, '100-' sorts between '10-' and '11-'). The
    indices must be 0, 1, ... without gaps or repeats: a missing one would shift what every later
    label means. Other names (`..evil`, `lost+found`) are refused here, by name, before the client
    registers: the number of folders can only be checked against the federation's dataset after
    registration (`load_client_split`), and a stray folder would otherwise pass until then."""
    real_root = os.path.realpath(root)
    by_index: dict[int, str] = {}
    for entry in _listing(root):
        if entry.is_symlink():
            if os.path.isdir(entry.path):
                _check_link(entry.path, real_root)  # refuses it
            continue  # a link to a file beside the class folders: never read
        if not entry.is_dir(follow_symlinks=False):
            continue  # a file beside the class folders (notes, a manifest): not a class
        match = _CLASS_DIR.fullmatch(entry.name)
        if match is None:
            raise GeflError(f"{entry.path} is not a class folder: class folders are named <index>-<name> with the "
                            "class's index in the dataset first (e.g. 00-t-shirt-top, as `gefl data split` writes "
                            "them); rename or remove it")
        index = int(match.group(1))
        if index in by_index:
            raise GeflError(f"class folders {root / by_index[index]} and {entry.path} both have index {index}; "
                            "each class index must name one folder: merge or renumber them")
        by_index[index] = entry.name
    if len(by_index) > MAX_CLASSES:
        raise GeflError(f"{root} has {len(by_index)} class folders; at most {MAX_CLASSES} classes are supported")
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        first = ", ".join(f"{i:02d}" for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise GeflError(f"{root} has {len(by_index)} class folders, but none with index {first} (the highest "
                        f"is {max(by_index):02d}); number the class folders 00, 01, ... without gaps, one per "
                        "class of the dataset, empty ones included, so each index is that class's label")
    return [by_index[i] for i in range(len(by_index))]


def _listing(folder: str | Path) -> list[os.DirEntry]:
    """A folder's entries sorted by name; an unreadable folder is refused by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise GeflError(f"{folder} cannot be listed ({exc.strerror}); check its permissions") from None


def _stat(path: str | Path, follow: bool) -> os.stat_result:
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError as exc:
        raise GeflError(f"{path} cannot be read ({exc.strerror}); check its permissions or delete it") from None


def _class_images(class_root: Path, real_root: str) -> list[tuple[str, FileKey]]:
    """Image files under one class folder (searched recursively, like torchvision) as (path
    relative to the folder, file key: which file it is, whatever the path).

    Directory links are not followed (`_check_link`), and a directory reached twice (a bind
    mount of its parent) is refused, so the search ends. Special files with an image's name (a
    FIFO, a device) are refused: opening one would block, or never end. A link to a file keeps
    the key of the file it leads to, so `read_image_folder` counts each file once.
    """
    found: list[tuple[str, FileKey]] = []
    top = _stat(class_root, follow=False)
    visited = {(top.st_dev, top.st_ino)}
    pending = [class_root]
    while pending:
        folder = pending.pop()
        for entry in _listing(folder):
            path = Path(entry.path)
            if entry.is_symlink():
                if not _is_image_name(entry.name) and not os.path.isdir(entry.path):
                    continue  # a link that is neither a folder nor an image is never read
                target = _check_link(entry.path, real_root)
                if not os.path.exists(entry.path):
                    raise GeflError(f"{path} is a symbolic link to {target}, which does not exist; fix or delete "
                                    "the link")
                st = _stat(path, follow=True)
            elif entry.is_dir(follow_symlinks=False):
                st = _stat(path, follow=False)
                if (st.st_dev, st.st_ino) in visited:
                    raise GeflError(f"{path} is a directory already read under another path (a bind mount?); "
                                    "each image must be in the data directory once")
                visited.add((st.st_dev, st.st_ino))
                pending.append(path)
                continue
            elif not _is_image_name(entry.name):
                continue
            else:
                st = _stat(path, follow=False)
            if not stat.S_ISREG(st.st_mode):
                raise GeflError(f"{path} is not a regular file (a FIFO, socket or device with an image's name); "
                                "delete it")
            found.append((path.relative_to(class_root).as_posix(), (st.st_dev, st.st_ino)))
    return found


def _once(root: Path, classes: list[str], samples: list[tuple[str, int, FileKey]]) -> list[tuple[str, int, FileKey]]:
    """`samples` (sorted) with each file once, under its first path in name order: a link to an
    image, or a hard link, in its own class folder would count (and weigh) the image twice. Two
    paths to one file in different class folders are refused, since an image has one label."""
    first: dict[FileKey, tuple[str, int]] = {}
    kept = []
    for name, label, key in samples:
        if key in first:
            other, other_label = first[key]
            if other_label != label:
                raise GeflError(f"{root / classes[label] / name} and {root / classes[other_label] / other} are the "
                                "same file (a link) in two class folders; an image has one label: delete one")
            continue
        first[key] = (name, label)
        kept.append((name, label, key))
    return kept


def open_image(file: str | Path, key: FileKey | None = None) -> Image.Image:
    """`file` decoded (in its own mode), or a GeflError naming it: for every image that comes from
    elsewhere (a client's data directory, an image given to `gefl infer`).

    The file is opened without blocking and must be a regular file (a FIFO would hang the read),
    and the one a directory scan found when `key` (its st_dev, st_ino) is given. Only the formats
    of IMAGE_SUFFIXES are tried: pillow would otherwise try every plugin it has on a file, EPS among
    them, whose reader runs Ghostscript. The size is checked from the header, before any pixel is
    decoded: a few-KB PNG can declare 50,000 x 50,000 pixels, and pillow's own limit
    (MAX_IMAGE_PIXELS, 89 Mpixels, and only a warning below twice that) is sized for photos, not
    for a board with 1 GB. Decoders raise many kinds of exception on hostile bytes (OSError,
    SyntaxError, struct.error, IndexError, ...), so any exception while decoding this one file is
    reported as the file being unreadable.
    """
    file = Path(file)
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise GeflError(f"image {file} does not exist") from None
    except OSError as exc:
        raise GeflError(f"{file} cannot be opened ({exc.strerror}); check its permissions or delete it") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if key is not None and (not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != key):
            raise GeflError(f"{file} changed while the data directory was read; read it again when nothing is "
                            "writing to it")
        if not stat.S_ISREG(st.st_mode):
            raise GeflError(f"{file} is not a regular file (a directory, FIFO or device); give an image file")
        try:
            with Image.open(fh, formats=_pillow_formats()) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise GeflError(f"{file} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                                    "an image may have here (training resizes every image to 32x32); resize it "
                                    "(a decompression bomb declares a huge size in a small file)")
                image.load()
                return image.copy()
        except GeflError:
            raise
        except Exception as exc:  # see the docstring: hostile bytes raise anything
            reason = str(exc) or type(exc).__name__
            raise GeflError(f"{file} is not an image pillow can read ({reason}); replace or delete it") from None


def _open_image(file: Path, key: FileKey, channels: int | None) -> tuple[Image.Image, bool]:
    """`file` (see `open_image`) converted to `channels` (see `read_image_folder`), and whether it
    was grayscale."""
    image = open_image(file, key)
    gray = image.mode in _GRAYSCALE_MODES
    target = {1: "L", 3: "RGB", None: "L" if gray else "RGB"}[channels]
    return image.convert(target), gray


def _pillow_formats() -> list[str]:
    """The pillow formats of IMAGE_SUFFIXES that this pillow can open (WebP is optional)."""
    Image.init()
    return [f for f in _FORMATS if f in Image.OPEN]


def read_image_folder(path: str | Path, channels: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a directory in ImageFolder layout as (uint8 images (N, C, H, W), int64 labels, class folder names).

    Class folders are the sub-directories named `<index>-<name>`, including empty ones; a class's
    label is its index, and the names come back in label order (see `_class_folders`). Samples
    are ordered by file name across all classes, so a directory written by `write_split` reads
    back in training-set order. `channels` 1 or 3 converts every image to grayscale ("L") or
    "RGB"; None gives 1 channel if every image is grayscale, else 3. Images keep their size,
    which must be the same for all of them.

    What this returns is what a client trains on and registers with, so anything that would
    make it differ from the images in the directory is refused, by name, before any network
    traffic: links to directories or out of the directory (`_check_link`), one file under two
    labels, special files, undecodable or oversized images (`_open_image`).
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
        loose = [p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise GeflError(f"{root} has no class sub-folders{hint}; put each class's images in a sub-folder of its "
                        f"own: {root}/<index>-<class>/<image>.png, one sub-folder per class of the dataset")
    real_root = os.path.realpath(root)
    samples = _once(root, classes, sorted((name, label, key) for label, cls in enumerate(classes)
                                          for name, key in _class_images(root / cls, real_root)))
    if not samples:
        raise GeflError(f"{root} has {len(classes)} class folders but no images in any of them (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}); put the images in the class folders")

    arrays: list[np.ndarray] = []
    all_gray = True
    first: tuple[Path, tuple[int, int]] | None = None
    for name, label, key in samples:
        file = root / classes[label] / name
        converted, gray = _open_image(file, key, channels)
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
    labels = np.asarray([label for _, label, _ in samples], dtype=np.int64)
    return images, labels, classes


def load_client_split(path: str | Path, num_classes: int, channels: int) -> Split:
    """A client's image folder as training tensors: float32 (N, C, 32, 32) in [-1, 1] and int64 labels."""
    images, labels, classes = read_image_folder(path, channels)
    return client_split(images, labels, classes, num_classes, path)


def client_split(images: np.ndarray, labels: np.ndarray, classes: list[str], num_classes: int,
                 path: str | Path) -> Split:
    """What `read_image_folder` returned, as training tensors (the client reads its folder once, so
    what it registered with is what it trains on). The number of class folders must match the
    federation's dataset, or labels would mean other classes."""
    import torch

    from gefl.data import Split, to_tensor

    if len(classes) != num_classes:
        raise GeflError(
            f"{path} has {len(classes)} class folders, but the federation's dataset has {num_classes} classes: "
            f"{', '.join(classes)}; make one folder per class, empty ones included, named <index>-<name> with "
            "the class's index in the dataset (`gefl data split` writes them so)"
        )
    return Split(to_tensor(images), torch.as_tensor(labels, dtype=torch.long))
