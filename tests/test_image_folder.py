"""Client data as ImageFolder directories: `gefl data split` and reading the folders back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gefl.cli import main
from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.image_folder import class_dir_name, load_client_split, read_image_folder, write_split
from gefl.simulation import _split_clients

FMNIST_DIRS = ["00-t-shirt-top", "01-trouser", "02-pullover", "03-dress", "04-coat",
               "05-sandal", "06-shirt", "07-sneaker", "08-bag", "09-ankle-boot"]


@pytest.fixture(scope="module")
def iid_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("iid") / "clients"
    manifest = write_split("fashion-mnist", 4, out, kind="iid", samples_per_client=100, seed=3, progress=None)
    return out, manifest


def test_client_folder_holds_exactly_the_simulated_clients_images(iid_split, fmnist):
    out, manifest = iid_split
    cfg = config_from_dict({"dataset": "fashion-mnist", "num_clients": 4, "seed": 3,
                            "partition": {"kind": "iid", "samples_per_client": 100}})
    simulated = _split_clients(cfg, fmnist, torch.device("cpu"))

    client = load_client_split(out / "client-002", num_classes=10, channels=1)
    assert client.images.shape == (100, 1, 32, 32) and client.labels.dtype == torch.long
    assert torch.equal(client.images, simulated[2].images)
    assert torch.equal(client.labels, simulated[2].labels)

    assert sorted(p.name for p in out.iterdir()) == ["client-000", "client-001", "client-002", "client-003",
                                                    "manifest.json"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["class_dirs"] == FMNIST_DIRS and manifest["classes"][0] == "T-shirt/top"
    assert manifest["partition"] == {"kind": "iid", "seed": 3, "samples_per_client": 100, "alpha": 0.3,
                                     "shards_per_client": 2}
    for entry, c in zip(manifest["clients"], range(4)):
        assert entry["client"] == c and entry["dir"] == f"client-{c:03d}" and entry["num_samples"] == 100
        assert entry["label_histogram"] == np.bincount(simulated[c].labels.numpy(), minlength=10).tolist()


def test_pngs_keep_the_original_pixels_and_training_index(iid_split, fmnist):
    out, _ = iid_split
    files = sorted((out / "client-000").glob("*/*.png"))
    assert len(files) == 100
    with Image.open(files[0]) as image:
        assert image.mode == "L" and image.size == (28, 28)
    index, label = int(files[0].stem), FMNIST_DIRS.index(files[0].parent.name)
    assert fmnist.train.labels[index].item() == label
    images, labels, classes = read_image_folder(out / "client-000")
    assert images.dtype == np.uint8 and images.shape == (100, 1, 28, 28) and labels.dtype == np.int64
    assert classes == FMNIST_DIRS
    names = sorted(p.name for p in files)
    assert [int(n[:5]) for n in names] == sorted(int(n[:5]) for n in names)  # read back in training-set order
    rgb, _, _ = read_image_folder(out / "client-000", channels=3)
    assert rgb.shape == (100, 3, 28, 28) and (rgb == images).all()


def test_dirichlet_clients_keep_every_class_folder(tmp_path):
    out = tmp_path / "skewed"
    manifest = write_split("fashion-mnist", 5, out, kind="dirichlet", alpha=0.1, samples_per_client=100,
                           seed=1, progress=None)
    empty = 0
    for entry in manifest["clients"]:
        client_dir = out / entry["dir"]
        assert sorted(p.name for p in client_dir.iterdir()) == FMNIST_DIRS
        empty += sum(1 for d in client_dir.iterdir() if not any(d.iterdir()))
        images, labels, classes = read_image_folder(client_dir)
        assert len(classes) == 10 and labels.min() >= 0 and labels.max() <= 9
        assert np.bincount(labels, minlength=10).tolist() == entry["label_histogram"]
        assert len(images) == entry["num_samples"]
    assert empty > 0  # alpha 0.1 leaves some clients without some classes
    assert sum(c["num_samples"] for c in manifest["clients"]) == 500


def test_cli_data_split(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "split", "--clients", "3", "--partition", "shards", "--samples-per-client", "20",
                 "--seed", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["client-000", "client-001", "client-002", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["partition"]["kind"] == "shards" and manifest["dataset"] == "fashion-mnist"
    assert [c["num_samples"] for c in manifest["clients"]] == [20, 20, 20]
    assert "client-002" in capsys.readouterr().out

    assert main(["data", "split", "--clients", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gefl: error: ") and "not empty" in err and str(out) in err

    assert main(["data", "split", "--clients", "3", "--samples-per-client", "many", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--samples-per-client" in capsys.readouterr().err


def test_slugs():
    assert class_dir_name(0, "T-shirt/top") == "00-t-shirt-top"
    assert class_dir_name(9, "Ankle boot") == "09-ankle-boot"
    assert class_dir_name(3, "3") == "03-3"


def _png(path, size=(8, 8), value=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_reading_a_hand_made_folder(tmp_path):
    _png(tmp_path / "b" / "001.png", value=10)
    _png(tmp_path / "a" / "002.PNG", value=20)
    _png(tmp_path / "a" / "000.jpg", value=30, mode="RGB")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "c").mkdir()
    images, labels, classes = read_image_folder(tmp_path)
    assert classes == ["a", "b", "c"]
    assert labels.tolist() == [0, 1, 0] and images.shape == (3, 3, 8, 8)
    gray, _, _ = read_image_folder(tmp_path, channels=1)
    assert gray.shape == (3, 1, 8, 8) and gray[1, 0, 0, 0] == 10


def test_read_errors_name_the_problem(tmp_path):
    with pytest.raises(GeflError, match="does not exist"):
        read_image_folder(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(GeflError, match="not a directory"):
        read_image_folder(tmp_path / "file.png")

    flat = tmp_path / "flat"
    _png(flat / "0.png")
    with pytest.raises(GeflError, match="no class sub-folders"):
        read_image_folder(flat)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(GeflError, match="no images"):
        read_image_folder(empty)

    corrupt = tmp_path / "corrupt"
    _png(corrupt / "a" / "0.png")
    (corrupt / "b" / "1.png").parent.mkdir()
    (corrupt / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(GeflError, match=r"1\.png is not an image"):
        read_image_folder(corrupt)

    sizes = tmp_path / "sizes"
    _png(sizes / "a" / "0.png", size=(28, 28))
    _png(sizes / "b" / "1.png", size=(32, 32))
    with pytest.raises(GeflError, match=r"differ in size: .*1\.png is 32x32 but .*0\.png is 28x28"):
        read_image_folder(sizes)

    nine = tmp_path / "nine"
    for name in FMNIST_DIRS[:9]:
        _png(nine / name / f"{name}.png")
    with pytest.raises(GeflError, match="has 9 class folders, but the federation's dataset has 10 classes"):
        load_client_split(nine, num_classes=10, channels=1)
