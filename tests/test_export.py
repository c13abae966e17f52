"""ONNX export and torch-free inference, on a real (briefly trained) run and the real test images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gefl.export.infer import Classifier, collect_images
from gefl.export.metadata import ModelInfo
from gefl.export.onnx_export import PARITY_TOLERANCE, export_run, load_tier
from PIL import Image

from gefl import simulate
from gefl.data import read_idx, to_tensor
from gefl.errors import GeflError

REPO = Path(__file__).resolve().parent.parent
FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TIERS = ["cnn2", "cnn4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    simulate({"algorithm": "fedavg", "num_clients": 2, "tiers": TIERS, "rounds": 1,
              "partition": {"samples_per_client": 1000}, "eval": {"every": 1}}, out=out)
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    report = export_run(run_dir, out, quantize_mode="static")
    return out, report


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return read_idx(FMNIST_TEST)[:64]


def write_pngs(images: np.ndarray, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(directory / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_every_tier_exports_checked_with_metadata_and_a_dynamic_batch(exported, run_dir):
    out, report = exported
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads((out / "export_report.json").read_text()) == report
    assert set(report["tiers"]) == set(TIERS)
    for tier, entry in report["tiers"].items():
        for name in (f"{tier}.onnx", f"{tier}.int8.onnx"):
            proto = onnx.load(str(out / name))
            onnx.checker.check_model(proto, full_check=True)
            info = ModelInfo.from_props({p.key: p.value for p in proto.metadata_props}, name)
            assert (info.tier, info.channels, info.input_size, info.source_size) == (tier, 1, 32, (28, 28))
            assert info.classes[0] == "T-shirt/top" and info.mean == [0.5] and info.std == [0.5]
            assert info.run_id == run_dir.name and info.precision == ("int8" if "int8" in name else "fp32")
            # Nothing of the build machine travels in the file.
            assert str(REPO) not in proto.SerializeToString().decode("latin-1")
            session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
            for batch in (1, 7):
                (logits,) = session.run(None, {"images": np.zeros((batch, 1, 32, 32), np.float32)})
                assert logits.shape == (batch, 10)
        fp32 = entry["fp32"]
        assert fp32["parity_ok"] and fp32["max_abs_logit_diff"] < PARITY_TOLERANCE and fp32["top1_agreement"] == 1.0
        # Same weights, same test set: the fp32 file reproduces the run's own evaluation.
        assert fp32["accuracy"] == pytest.approx(summary["tiers"][tier]["final_acc"], abs=0.01)
        assert fp32["accuracy"] == entry["torch_accuracy"] and fp32["accuracy"] > 50
        int8 = entry["int8"]
        assert int8["bytes"] < 0.6 * fp32["bytes"]
        assert abs(int8["accuracy_drop"]) < 2.0 and int8["top1_agreement_with_fp32"] > 0.95


def test_dynamic_quantization_and_tier_selection(run_dir, tmp_path):
    report = export_run(run_dir, tmp_path, tiers=["cnn4"], quantize_mode="dynamic")
    assert list(report["tiers"]) == ["cnn4"]
    int8 = report["tiers"]["cnn4"]["int8"]
    assert int8["mode"] == "dynamic" and int8["bytes"] < report["tiers"]["cnn4"]["fp32"]["bytes"]
    assert abs(int8["accuracy_drop"]) < 2.0
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["cnn4.int8.onnx", "cnn4.onnx"]


def test_export_refuses_what_it_cannot_export(run_dir, tmp_path):
    with pytest.raises(GeflError, match="no tier 'cnn9'; its tiers are: cnn2, cnn4"):
        export_run(run_dir, tmp_path / "a", tiers=["cnn9"])
    with pytest.raises(GeflError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "b")
    with pytest.raises(GeflError, match="unknown --quantize 'int4'"):
        export_run(run_dir, tmp_path / "c", quantize_mode="int4")
    broken = tmp_path / "broken"
    (broken / "weights").mkdir(parents=True)
    (broken / "weights" / "cnn2.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(GeflError, match="cannot read .*cnn2.safetensors"):
        load_tier(broken, "cnn2")


def test_infer_preprocessing_matches_training(exported, test_images, tmp_path):
    """PIL's float bilinear resize must give the tensors the network was trained on."""
    classifier = Classifier(exported[0] / "cnn4.onnx")
    paths = write_pngs(test_images, tmp_path)
    ours = np.stack([classifier.preprocess(Image.open(p), p) for p in paths])
    theirs = to_tensor(test_images[:, None]).numpy()
    assert ours.shape == theirs.shape == (64, 1, 32, 32)
    assert np.abs(ours - theirs).max() < 1e-5


def test_gefl_infer_classifies_a_directory_like_the_trained_model(exported, run_dir, test_images, tmp_path):
    paths = write_pngs(test_images, tmp_path / "images")
    model, _ = load_tier(run_dir, "cnn4")
    with torch.inference_mode():
        expected = model(to_tensor(test_images[:, None])).argmax(1).tolist()
    classes = Classifier(exported[0] / "cnn4.onnx").info.classes
    result = subprocess.run(
        [sys.executable, "-m", "gefl.cli", "infer", str(exported[0] / "cnn4.onnx"), str(tmp_path / "images"),
         "--top", "3"], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 64
    for path, line, want in zip(paths, lines, expected):
        name, ranked = line.split(": ", 1)
        top = [entry.rsplit(" ", 1) for entry in ranked.split(", ")]
        assert name == str(path) and len(top) == 3
        assert top[0][0] == classes[want]
        probs = [float(p) for _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001


def test_infer_never_imports_torch(exported, test_images, tmp_path):
    image = write_pngs(test_images[:1], tmp_path)[0]
    code = ("import sys; from gefl.cli import main; rc = main(['infer', sys.argv[1], sys.argv[2]]); "
            "heavy = sorted(m for m in ('torch', 'torchvision', 'yaml', 'safetensors') if m in sys.modules); "
            "print('imported:', heavy); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(exported[0] / "cnn2.int8.onnx"), str(image)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "imported: []"


@pytest.mark.parametrize("case", ["not-onnx", "no-metadata", "rgb", "wrong-size", "empty-dir", "not-an-image"])
def test_infer_names_the_problem(case, exported, test_images, tmp_path):
    model, target = exported[0] / "cnn2.onnx", tmp_path / "image.png"
    Image.fromarray(test_images[0]).save(target)
    if case == "not-onnx":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"this is not a protobuf")
        message = "is not an ONNX model onnxruntime can load"
    elif case == "no-metadata":
        proto = onnx.load(str(exported[0] / "cnn2.onnx"))
        del proto.metadata_props[:]
        model = tmp_path / "plain.onnx"
        onnx.save(proto, str(model))
        message = "has no gefl metadata"
    elif case == "rgb":
        Image.fromarray(test_images[0]).convert("RGB").save(target)
        message = "image mode is RGB, but this model .* takes grayscale images"
    elif case == "wrong-size":
        Image.fromarray(test_images[0]).resize((40, 30)).save(target)
        message = "image is 40x30 pixels; this model takes 28x28 or 32x32 images"
    elif case == "empty-dir":
        target = tmp_path / "empty"
        target.mkdir()
        message = "no images in directory"
    else:
        target.write_bytes(b"GIF89a garbage")
        message = "is not an image pillow can read"
    with pytest.raises(GeflError, match=message):
        Classifier(model).classify(collect_images(target))
    result = subprocess.run([sys.executable, "-m", "gefl.cli", "infer", str(model), str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gefl: error:")


def test_infer_extra_runs_in_a_virtualenv_without_torch(exported, test_images, tmp_path):
    """`pip install gefl-edge[infer]` must be all a board needs: no torch, under 100 MB resident."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{REPO}[infer]"],
                   check=True, env=env, capture_output=True)
    python = str(venv / "bin" / "python")
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    paths = write_pngs(test_images[:8], tmp_path / "images")
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.stdout, end=''); print(r.stderr, end='', file=sys.stderr); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([python, "-c", code, str(venv / "bin" / "gefl"), "infer",
                             str(exported[0] / "cnn4.int8.onnx"), str(paths[0])],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{paths[0]}: ")
    assert int(lines[-1].split()[1]) < 100 * 1024, lines[-1]
    train_only = subprocess.run([str(venv / "bin" / "gefl"), "simulate"], capture_output=True, text=True)
    assert train_only.returncode == 2 and "pip install 'gefl-edge[train]'" in train_only.stderr
