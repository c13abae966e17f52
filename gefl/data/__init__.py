"""Datasets and partitions.

Every dataset is decoded once into uint8 arrays and turned into one float tensor, resized to
32x32 and normalised to [-1, 1]; training then only indexes tensors. Decoding reads the raw
distribution formats (IDX for MNIST-like sets, the binary CIFAR-10 batches) with numpy, so no
pickle is ever loaded from a data directory.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from gefl.errors import GeflError, unknown_name
from gefl.registry import Registry

if TYPE_CHECKING:
    from gefl.schema import Config

IMAGE_SIZE = 32
MEAN, STD = 0.5, 0.5
"""Normalisation of the paper: (x - 0.5) / 0.5 maps [0, 1] pixels to [-1, 1]."""

SYSTEM_DATA_ROOT = Path("/usr/share/datasets")


@dataclass
class Split:
    """Images as float32 (N, C, 32, 32) in [-1, 1] and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    source_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    """(height, width) of the images as distributed, before the resize to 32x32."""

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- raw formats

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise GeflError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise GeflError(f"{path} is truncated: its IDX header is incomplete")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise GeflError(f"{path} holds {len(data) - header} bytes of data, its header promises {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_dir_complete(directory: Path) -> bool:
    return all(_find_idx(directory, stem) for pair in IDX_FILES.values() for stem in pair)


def _load_idx_dir(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for split in ("train", "test"):
        images_path, labels_path = (_find_idx(directory, s) for s in IDX_FILES[split])
        if images_path is None or labels_path is None:
            raise GeflError(f"{directory}: the {split} images or labels (IDX files {', '.join(IDX_FILES[split])}) "
                            "are missing")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise GeflError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
        out += [images[:, None], labels]
    return out[0], out[1], out[2], out[3]


CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch of CIFAR-10's binary version: records of 1 label byte + 3072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise GeflError(f"{path} is not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple of {CIFAR_RECORD})")
    records = raw.reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_dir_complete(directory: Path) -> bool:
    return (directory / "test_batch.bin").is_file() and (directory / "data_batch_1.bin").is_file()


def _load_cifar_dir(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = [read_cifar_bin(p) for p in sorted(directory.glob("data_batch_*.bin"))]
    test_x, test_y = read_cifar_bin(directory / "test_batch.bin")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y


# --------------------------------------------------------------------------- registry

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""train images (N, C, H, W) uint8, train labels, test images, test labels."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    load: Callable[[Path | None], Arrays]
    how_to_get: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    name: str, classes: Sequence[str], load: Callable[[Path | None], Arrays], how_to_get: str = ""
) -> None:
    """Add a dataset. `load(data_dir)` returns uint8 arrays (train_x, train_y, test_x, test_y),
    images shaped (N, C, H, W); `data_dir` is the user's --data-dir or $GEFL_DATA_DIR, or None.
    The arrays are resized and normalised here, like the built-in sets. Registering a name of
    your own again replaces that dataset; a built-in dataset's name is refused (see gefl.registry).
    """
    DATASETS.register(name, DatasetSpec(name, tuple(classes), load, how_to_get))


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_classes(name: str) -> list[str]:
    """A registered dataset's class names, without loading it (a client holds only its own images)."""
    return list(DATASETS.get(name).classes)


def torchvision_cache() -> Path:
    """Where torchvision datasets live when nobody says otherwise (TORCH_HOME aware)."""
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(torch_home) / "datasets"


def _candidate_dirs(name: str, tv_folder: str, data_dir: Path | None, extra: Sequence[str] = ()) -> list[Path]:
    """Directories to try, in the documented order: user dir, $GEFL_DATA_DIR, system, torchvision cache."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(data_dir)
    if os.environ.get("GEFL_DATA_DIR"):
        roots.append(Path(os.environ["GEFL_DATA_DIR"]))
    roots.append(SYSTEM_DATA_ROOT / name)
    dirs: list[Path] = []
    for root in roots:
        dirs += [root, root / name, root / tv_folder / "raw", *(root / e for e in extra)]
    dirs += [torchvision_cache() / tv_folder / "raw", *(torchvision_cache() / e for e in extra)]
    return dirs


def _not_found(searched: list[Path], why: str) -> GeflError:
    roots = list(dict.fromkeys(str(p) for p in searched))
    return GeflError(f"no copy found (looked in {', '.join(roots)}) and {why}")


def _idx_loader(name: str, tv_folder: str) -> Callable[[Path | None], Arrays]:
    def load(data_dir: Path | None) -> Arrays:
        searched = _candidate_dirs(name, tv_folder, data_dir)
        for directory in searched:
            if _idx_dir_complete(directory):
                return _load_idx_dir(directory)
        _torchvision_download(tv_folder, searched)
        return _load_idx_dir(torchvision_cache() / tv_folder / "raw")

    return load


def _load_cifar10(data_dir: Path | None) -> Arrays:
    searched = _candidate_dirs("cifar-10", "cifar-10-batches-bin", data_dir, ["cifar-10-batches-bin"])
    for directory in searched:
        if _cifar_dir_complete(directory):
            return _load_cifar_dir(directory)
    # torchvision only fetches CIFAR's pickled python version, which we never unpickle.
    raise _not_found(searched, "CIFAR-10 is read only in its binary version (cifar-10-batches-bin)")


def _torchvision_download(tv_folder: str, searched: list[Path]) -> None:
    """Last resort: torchvision's own download into its cache. Needs internet; GEFL_NO_DOWNLOAD=1 skips it."""
    if os.environ.get("GEFL_NO_DOWNLOAD"):
        raise _not_found(searched, "downloading is disabled (GEFL_NO_DOWNLOAD is set)")
    import torchvision.datasets as tvd

    root = torchvision_cache()
    try:
        getattr(tvd, tv_folder)(root=str(root), train=True, download=True)
        getattr(tvd, tv_folder)(root=str(root), train=False, download=True)
    except Exception as exc:  # no network, DNS failure, HTTP errors: all mean "not available"
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _not_found(searched, f"the download failed ({first_line})") from exc


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

register_dataset(
    "fashion-mnist", FASHION_CLASSES, _idx_loader("fashion-mnist", "FashionMNIST"),
    "On Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist/), or put the four IDX files (train-images-idx3-ubyte.gz, ...) "
    "in a directory and pass --data-dir DIR or set GEFL_DATA_DIR.",
)
register_dataset(
    "mnist", tuple(str(i) for i in range(10)), _idx_loader("mnist", "MNIST"),
    "Put MNIST's four IDX files (train-images-idx3-ubyte.gz, ...) in a directory and pass --data-dir DIR "
    "or set GEFL_DATA_DIR; with internet access torchvision downloads them into its cache.",
)
register_dataset(
    "cifar-10", CIFAR_CLASSES, _load_cifar10,
    "Download CIFAR-10's binary version (cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), "
    "unpack it and pass --data-dir DIR (the directory holding cifar-10-batches-bin/) or set GEFL_DATA_DIR.",
)
DATASETS.seal_builtins()


# --------------------------------------------------------------------------- tensors

def to_tensor(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, size, size) in [-1, 1], resized in one batched call."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x.clamp_(0.0, 1.0)
    return x.sub_(MEAN).div_(STD)


@dataclass
class RawDataset:
    """A dataset as distributed: uint8 images (N, C, H, W) at their original size, int64 labels.

    What `load_dataset` resizes and normalises, and what `gefl data split` writes out as image
    files (PNGs of the original pixels, not of the 32x32 training tensors).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def load_raw(name: str, data_dir: str | Path | None = None) -> RawDataset:
    """Load a registered dataset's uint8 arrays, looked up as `load_dataset` documents."""
    spec = DATASETS.get(name)
    directory = Path(data_dir) if data_dir is not None else None
    if directory is not None and not directory.is_dir():
        raise GeflError(f"--data-dir {directory} does not exist or is not a directory. {spec.how_to_get}")
    try:
        train_x, train_y, test_x, test_y = spec.load(directory)
    except GeflError as exc:
        raise GeflError(f"cannot load dataset {name!r}: {exc}. {spec.how_to_get}") from exc
    if train_x.ndim != 4 or test_x.ndim != 4:
        raise GeflError(f"dataset {name!r} must load images shaped (N, C, H, W); got {train_x.shape}")
    return RawDataset(
        name=name,
        train_x=train_x,
        train_y=np.asarray(train_y).astype(np.int64),
        test_x=test_x,
        test_y=np.asarray(test_y).astype(np.int64),
        classes=list(spec.classes),
    )


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a registered dataset, resized to 32x32 and normalised to [-1, 1]."""
    raw = load_raw(name, data_dir)
    return Dataset(
        name=name,
        train=Split(to_tensor(raw.train_x), torch.from_numpy(raw.train_y)),
        test=Split(to_tensor(raw.test_x), torch.from_numpy(raw.test_y)),
        classes=raw.classes,
        source_size=(int(raw.train_x.shape[-2]), int(raw.train_x.shape[-1])),
    )


# --------------------------------------------------------------------------- partitions

PARTITIONS = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str = "iid",
    *,
    samples_per_client: int | None = None,
    alpha: float = 0.3,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split training indices among clients; the same seed always gives the same split.

    A pool of `num_clients * samples_per_client` indices is drawn first (the paper gives each of
    10 clients 600 images, 1/100 of the training set); `None` uses the whole training set. The
    pool is then split IID, by a per-class Dirichlet(alpha) over clients, or into label-sorted
    shards, `shards_per_client` per client. The returned index arrays are disjoint and cover the pool.
    """
    labels = np.asarray(labels)
    if num_clients < 1:
        raise GeflError(f"num_clients must be at least 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    total = len(labels)
    pool_size = total if samples_per_client is None else num_clients * samples_per_client
    if pool_size > total:
        raise GeflError(
            f"{num_clients} clients x {samples_per_client} samples = {pool_size} exceeds the "
            f"{total} training images; lower partition.samples_per_client or num_clients"
        )
    pool = rng.permutation(total)[:pool_size]
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(pool, num_clients)]
    if kind == "dirichlet":
        if alpha <= 0:
            raise GeflError(f"partition.alpha must be > 0, got {alpha}")
        return _dirichlet(pool, labels[pool], num_clients, alpha, rng)
    if kind == "shards":
        num_shards = num_clients * shards_per_client
        if shards_per_client < 1 or num_shards > pool_size:
            raise GeflError(f"partition.shards_per_client={shards_per_client} does not fit {pool_size} images")
        ordered = pool[np.argsort(labels[pool], kind="stable")]
        shards = np.array_split(ordered, num_shards)
        order = rng.permutation(num_shards)
        return [
            np.sort(np.concatenate([shards[s] for s in order[c::num_clients]])) for c in range(num_clients)
        ]
    raise unknown_name("partition", kind, PARTITIONS)


def client_indices(cfg: Config, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training indices under the config's partition and seed."""
    p = cfg.partition
    return partition(labels, cfg.num_clients, p.kind, samples_per_client=p.samples_per_client, alpha=p.alpha,
                     shards_per_client=p.shards_per_client, seed=cfg.seed)


EVAL_SPLITS = ("test", "validation")
VALIDATION_STREAM = 0x5EED
"""Added to the run's seed for the validation draw, so that it is not FedDF's public draw."""


def validation_indices(cfg: Config, labels: np.ndarray) -> np.ndarray:
    """The validation set, as indices into the training set: `eval.validation_size` images
    drawn with the run's seed from those no client holds, so that choices made on it never see
    the test set and never score a model on its own training data."""
    pool = np.setdiff1d(np.arange(len(labels)), np.concatenate(client_indices(cfg, labels)))
    size = cfg.eval.validation_size
    if len(pool) < size:
        raise GeflError(f"eval.validation_size is {size}, but only {len(pool)} training images belong to no "
                        "client; lower eval.validation_size or partition.samples_per_client")
    return np.sort(np.random.default_rng(cfg.seed + VALIDATION_STREAM).choice(pool, size, replace=False))


def evaluation_split(cfg: Config, dataset: Dataset) -> Split:
    """What a run's accuracies are measured on (`eval.split`): the test set, or `validation_indices`."""
    if cfg.eval.split == "test":
        return dataset.test
    if cfg.eval.split == "validation":
        return dataset.train.subset(validation_indices(cfg, dataset.train.labels.numpy()))
    raise unknown_name("eval.split", cfg.eval.split, EVAL_SPLITS)


def public_indices(cfg: Config, dataset: Dataset) -> np.ndarray:
    """FedDF's unlabelled public set, as indices into `dataset.train`: `feddf.public_size` images
    drawn with the run's seed, from those no client holds when `dataset` is the federation's own."""
    f = cfg.feddf
    pool = np.arange(len(dataset.train))
    if dataset.name == cfg.dataset:
        pool = np.setdiff1d(pool, np.concatenate(client_indices(cfg, dataset.train.labels.numpy())))
    if len(pool) < f.public_size:
        raise GeflError(f"feddf.public_size is {f.public_size}, but only {len(pool)} training images of "
                        f"{dataset.name} belong to no client; lower feddf.public_size or name another "
                        "feddf.public_dataset")
    return np.sort(np.random.default_rng(cfg.seed).choice(pool, f.public_size, replace=False))


def public_images(cfg: Config) -> torch.Tensor:
    """The images of `public_indices`, from `feddf.public_dataset` or the federation's dataset."""
    dataset = load_dataset(cfg.feddf.public_dataset or cfg.dataset, cfg.data_dir)
    return dataset.train.images[torch.from_numpy(public_indices(cfg, dataset))]


def _dirichlet(
    pool: np.ndarray, pool_labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(pool_labels):
        members = rng.permutation(pool[pool_labels == cls])
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    # A client with no data cannot train; give it one image from the largest client.
    for client, part in enumerate(out):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in out]))
            out[client], out[donor] = out[donor][:1], out[donor][1:]
    return out


FEW_STEPS = 4
"""Fewer optimizer steps per local epoch than this, for the median client, draws a warning."""


def few_steps_warning(sizes: Sequence[int], batch_size: int) -> str | None:
    """A warning when the median client's data makes fewer than FEW_STEPS batches per local epoch.

    Local training counts epochs, not steps: at 100 clients of 60 images and batch 64 every
    epoch is a single step, of warm-up, generator and head alike, and a round trains a tenth of
    what it does at 10 clients of 600 (benchmarks/results/scale_fmnist.md measures it). The run is
    valid, only slow to learn, so this warns rather than refuses."""
    if not sizes:
        return None
    median = sorted(sizes)[len(sizes) // 2]
    steps = max(1, median // batch_size)
    if steps >= FEW_STEPS:
        return None
    suggested = max(1, median // FEW_STEPS)
    return (f"the median client holds {median} images: {steps} step(s) per local epoch at train.batch_size "
            f"{batch_size}, so each round trains little; a smaller batch (--set train.batch_size={suggested}) "
            f"gives {FEW_STEPS} or more")


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=num_classes).tolist()
