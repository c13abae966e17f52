import gzip

import numpy as np
import pytest
import torch

from gefl import data
from gefl.data import load_dataset, read_cifar_bin, read_idx, register_dataset, to_tensor
from gefl.errors import GeflError


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist_dir(directory, n_train=20, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        write_idx(directory / (name + suffix), arr, compress)
    return arrays


def test_real_fashion_mnist_is_32x32_in_minus_one_to_one(fmnist):
    assert fmnist.train.images.shape == (60000, 1, 32, 32)
    assert fmnist.test.images.shape == (10000, 1, 32, 32)
    assert fmnist.train.images.dtype == torch.float32
    assert fmnist.train.images.min().item() == -1.0 and fmnist.train.images.max().item() == 1.0
    assert torch.bincount(fmnist.test.labels).tolist() == [1000] * 10
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.num_classes == 10


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_a_data_dir_in_the_real_idx_format(tmp_path, compress):
    arrays = make_mnist_dir(tmp_path / "m", compress=compress)
    ds = load_dataset("mnist", tmp_path / "m")
    assert ds.train.images.shape == (20, 1, 32, 32) and ds.test.images.shape == (10, 1, 32, 32)
    assert ds.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    expected = to_tensor(arrays["train-images-idx3-ubyte"][:, None])
    assert torch.equal(ds.train.images, expected)


def test_data_dir_wins_over_gefl_data_dir(tmp_path, monkeypatch):
    make_mnist_dir(tmp_path / "user", n_train=20)
    make_mnist_dir(tmp_path / "env", n_train=30)
    monkeypatch.setenv("GEFL_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset("mnist", tmp_path / "user").train) == 20
    assert len(load_dataset("mnist").train) == 30


def test_torchvision_cache_layout_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", tmp_path / "nothing")
    make_mnist_dir(tmp_path / "torch" / "datasets" / "MNIST" / "raw", n_train=12)
    assert len(load_dataset("mnist").train) == 12


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", tmp_path / "nothing")
    with pytest.raises(GeflError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert "no copy found" in msg and "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(GeflError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "absent")


def test_corrupt_idx_files_are_refused(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(GeflError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x01" * 10)
    with pytest.raises(GeflError, match="promises 100"):
        read_idx(short)


def test_cifar10_binary_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("data_batch_1.bin", 6), ("data_batch_2.bin", 4), ("test_batch.bin", 5)]:
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        records.astype(np.uint8).tofile(root / name)
    x, y = read_cifar_bin(root / "test_batch.bin")
    assert x.shape == (5, 3, 32, 32) and y.shape == (5,)
    ds = load_dataset("cifar-10", tmp_path)
    assert ds.train.images.shape == (10, 3, 32, 32) and ds.in_channels == 3 and ds.classes[0] == "airplane"
    (root / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(GeflError, match="not a CIFAR-10 binary batch"):
        load_dataset("cifar-10", tmp_path)


def test_a_registered_dataset_is_resized_and_normalised():
    rng = np.random.default_rng(0)

    def load(_data_dir):
        return (rng.integers(0, 256, (8, 3, 24, 24), dtype=np.uint8), np.arange(8) % 2,
                rng.integers(0, 256, (4, 3, 24, 24), dtype=np.uint8), np.arange(4) % 2)

    register_dataset("test-tiny", ["a", "b"], load, "it is generated")
    ds = load_dataset("test-tiny")
    assert ds.train.images.shape == (8, 3, 32, 32) and ds.num_classes == 2
    assert ds.train.images.min() >= -1.0 and ds.train.images.max() <= 1.0
    with pytest.raises(GeflError, match="unknown dataset 'nope'.*test-tiny"):
        load_dataset("nope")


def test_few_steps_per_epoch_warns_with_a_batch_size_that_gives_enough():
    """100 clients x 60 images at batch 64: one step per epoch, and the hint's batch size gives four."""
    warning = data.few_steps_warning([60] * 100, 64)
    assert warning is not None and "60 images" in warning and "1 step(s)" in warning
    assert "train.batch_size=15" in warning and data.few_steps_warning([60] * 100, 15) is None
    assert data.few_steps_warning([600] * 10, 64) is None  # the paper's 10 x 600: nine steps
    assert data.few_steps_warning([], 64) is None
