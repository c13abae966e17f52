"""Client data as ImageFolder directories: `gefl data split` and reading the folders back."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gefl.cli import main
from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.image_folder import class_dir_name, load_client_split, read_image_folder, write_split
from gefl.simulation import _split_clients

from netutil import free_port

FMNIST_DIRS = ["00-t-shirt-top", "01-trouser", "02-pullover", "03-dress", "04-coat",
               "05-sandal", "06-shirt", "07-sneaker", "08-bag", "09-ankle-boot"]


@pytest.fixture(scope="module")
def iid_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("iid") / "clients"
    manifest = write_split("fashion-mnist", 4, out, kind="iid", samples_per_client=100, seed=3)
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
                           seed=1)
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
    _png(tmp_path / "01-b" / "001.png", value=10)
    _png(tmp_path / "00-a" / "002.PNG", value=20)
    _png(tmp_path / "00-a" / "000.jpg", value=30, mode="RGB")
    (tmp_path / "00-a" / "notes.txt").write_text("not an image")
    (tmp_path / "02-c").mkdir()
    (tmp_path / "README.txt").write_text("a file beside the class folders is no class")
    images, labels, classes = read_image_folder(tmp_path)
    assert classes == ["00-a", "01-b", "02-c"]
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
    (empty / "00-a").mkdir(parents=True)
    with pytest.raises(GeflError, match="no images"):
        read_image_folder(empty)

    corrupt = tmp_path / "corrupt"
    _png(corrupt / "00-a" / "0.png")
    (corrupt / "01-b" / "1.png").parent.mkdir()
    (corrupt / "01-b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(GeflError, match=r"1\.png is not an image"):
        read_image_folder(corrupt)

    sizes = tmp_path / "sizes"
    _png(sizes / "00-a" / "0.png", size=(28, 28))
    _png(sizes / "01-b" / "1.png", size=(32, 32))
    with pytest.raises(GeflError, match=r"differ in size: .*1\.png is 32x32 but .*0\.png is 28x28"):
        read_image_folder(sizes)

    nine = tmp_path / "nine"
    for name in FMNIST_DIRS[:9]:
        _png(nine / name / f"{name}.png")
    with pytest.raises(GeflError, match="has 9 class folders, but the federation's dataset has 10 classes"):
        load_client_split(nine, num_classes=10, channels=1)


# -- a client's data directory is untrusted input (the "Hardening" review) -----------------------------------------

def _classes(root, per_class=3, classes=3, size=(8, 8)):
    """`classes` class folders named as `gefl data split` names them, `per_class` images each, whose
    pixels all hold the class index (so a label can be checked against the image it labels)."""
    for label in range(classes):
        for i in range(per_class):
            _png(root / class_dir_name(label, f"c{label}") / f"{label:03d}{i:02d}.png", size=size, value=label)
    return root


def test_a_link_to_a_directory_is_never_followed(tmp_path):
    """`00-c0/loop -> ..` read each image once more per name the loop can spell: 600 images became
    24,600 (and the client registered with that count); two such links never finished."""
    root = _classes(tmp_path / "data")
    (root / "00-c0" / "loop").symlink_to("..")
    with pytest.raises(GeflError, match=r"00-c0/loop is a symbolic link to a directory \(into .*data\); links to "
                                        r"directories are not followed"):
        read_image_folder(root)
    (root / "00-c0" / "loop").unlink()
    (root / "00-c0" / "sub").mkdir()
    (root / "00-c0" / "sub" / "again").symlink_to(root / "01-c1", target_is_directory=True)
    with pytest.raises(GeflError, match=r"sub/again is a symbolic link to a directory \(into .*01-c1\)"):
        read_image_folder(root)
    (root / "00-c0" / "sub" / "again").unlink()
    images, labels, _ = read_image_folder(root)  # a real sub-folder is searched, as torchvision does
    assert len(images) == 9 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_links_out_of_the_data_directory_are_refused_and_named(tmp_path):
    outside = tmp_path / "elsewhere"
    _png(outside / "private.png", value=7)
    _png(outside / "folder" / "x.png")
    for link, to in (("01-c1/private.png", outside / "private.png"), ("02-c2/more", outside / "folder"),
                     ("03-c3", outside / "folder")):
        root = _classes(tmp_path / link.replace("/", "_"))
        (root / link).parent.mkdir(exist_ok=True)
        (root / link).symlink_to(to)
        with pytest.raises(GeflError, match=f"{link} is a symbolic link .*out of the data directory.* {to}"):
            read_image_folder(root)


def test_each_image_file_counts_once_and_under_one_label(tmp_path):
    root = _classes(tmp_path / "data")
    (root / "01-c1" / "zz-link.png").symlink_to(root / "01-c1" / "00100.png")  # inside, same class: read once
    os.link(root / "02-c2" / "00200.png", root / "02-c2" / "zz-hard.png")
    (root / "00-c0" / "notes.txt").symlink_to("/etc/hostname")  # not an image: never read, never refused
    images, labels, _ = read_image_folder(root)
    assert len(images) == 9 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    (root / "00-c0" / "zz-theft.png").symlink_to(root / "01-c1" / "00100.png")
    with pytest.raises(GeflError, match=r"00-c0/zz-theft.png and .*01-c1/00100.png are the same file .* in two "
                                        r"class folders"):
        read_image_folder(root)
    (root / "00-c0" / "zz-theft.png").unlink()
    (root / "00-c0" / "gone.png").symlink_to(root / "00-c0" / "missing.png")
    with pytest.raises(GeflError, match=r"gone.png is a symbolic link to .*missing.png, which does not exist"):
        read_image_folder(root)


@pytest.mark.parametrize("name", ["..evil", "evil", "00-", "-00-x", "00_x", "00-x.y", "\u0660\u0660-x", "lost+found"])
def test_class_folders_not_named_index_name_are_refused_when_read(tmp_path, name):
    """`..evil` used to pass the read (so the client registered) and fail only after registration."""
    root = _classes(tmp_path / "data")
    (root / name).mkdir()
    with pytest.raises(GeflError, match=rf"{re.escape(name)} is not a class folder: class folders are named "
                                        r"<index>-<name>"):
        read_image_folder(root)


def test_labels_come_from_the_folders_index_beyond_100_classes(tmp_path):
    """By name, '100-' sorts between '10-' and '11-': with 101 classes 90 labels went wrong silently."""
    root = _classes(tmp_path / "data", per_class=1, classes=101, size=(2, 2))
    images, labels, classes = read_image_folder(root)
    assert classes[10:12] == ["10-c10", "11-c11"] and classes[100] == "100-c100"
    assert (images[:, 0, 0, 0] == labels).all() and sorted(labels.tolist()) == list(range(101))
    split = load_client_split(root, num_classes=101, channels=1)
    assert torch.equal(split.labels, torch.as_tensor(labels))


def test_class_indices_with_gaps_or_repeats_are_refused(tmp_path):
    gap = _classes(tmp_path / "gap", classes=4)
    shutil.rmtree(gap / "02-c2")
    with pytest.raises(GeflError, match=r"has 3 class folders, but none with index 02 \(the highest is 03\)"):
        read_image_folder(gap)
    twice = _classes(tmp_path / "twice", classes=3)
    (twice / "001-again").mkdir()
    with pytest.raises(GeflError, match=r"class folders .*001-again and .*01-c1 both have index 1|"
                                        r"class folders .*01-c1 and .*001-again both have index 1"):
        read_image_folder(twice)


def test_hostile_image_files_are_refused_by_name(tmp_path):
    cases = {"text.png": b"just some text, not an image\n",
             "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"}
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 3).save(buffer, "PNG")
    cases["truncated.png"] = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    for name, data in cases.items():
        root = _classes(tmp_path / name)
        (root / "01-c1" / name).write_bytes(data)
        with pytest.raises(GeflError, match=rf"01-c1/{name} is not an image pillow can read \((cannot identify|"
                                            r"image file is truncated)"):
            read_image_folder(root)

    bomb = _classes(tmp_path / "bomb", size=(2000, 2000))  # 4 Mpixels in a file of a few KB
    assert (bomb / "00-c0" / "00000.png").stat().st_size < 20_000
    with pytest.raises(GeflError, match=r"00000.png is 2000x2000 pixels, more than the 1,048,576"):
        read_image_folder(bomb)


@pytest.mark.parametrize("hostile", ["two-loops", "fifo"])
def test_the_client_refuses_a_hostile_data_directory_before_registering(tmp_path, hostile):
    """`gefl client run`, a real process: two loops (or a FIFO named like an image) used to hang the
    reader for ever; now the client stops at once, exit code 2, naming the entry, and never
    reaches the aggregator's address (nothing listens there)."""
    root = _classes(tmp_path / "data")
    if hostile == "two-loops":
        (root / "00-c0" / "loop").symlink_to("..")
        (root / "00-c0" / "loop2").symlink_to("..")
        expected = "00-c0/loop is a symbolic link to a directory"
    else:
        os.mkfifo(root / "01-c1" / "pipe.png")
        expected = "01-c1/pipe.png is not a regular file"
    proc = subprocess.run([sys.executable, "-m", "gefl.cli", "client", "run", "--aggregator",
                           f"127.0.0.1:{free_port()}", "--data-dir", str(root), "--give-up", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "GEFL_TOKEN": "t"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gefl: error: ") and expected in proc.stderr and "Traceback" not in proc.stderr
    assert "register" not in proc.stdout
