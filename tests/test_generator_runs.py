"""Every generator family's paper preset, end to end in a short federation on the real Fashion-MNIST;
AvgKD; and `gefl samples` on real runs. The full paper schedules run in benchmarks/paper_fmnist.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gefl import simulate
from gefl.cli import main as gefl_main
from gefl.protocol.wire import encode_state
from gefl.rounds.rundir import load_generator
from gefl.tiers.models import count_parameters

# One client per tier, 16 images each and batches of 8: the paper-sized generators train for two
# steps and sample two batches. The DDPMs keep their paper architecture but sample in 10 steps
# instead of 200/500 (a 200-step 32x32 DDPM batch takes minutes of CPU; the benchmark runs those).
SHORT = {
    "num_clients": 2,
    "tiers": ["cnn3c", "cnn4c"],
    "rounds": 1,
    "partition": {"kind": "iid", "samples_per_client": 16},
    "train": {"batch_size": 8, "local_epochs": 1},
    "eval": {"every": 1},
    "workers": 1,
}

PAPER_SIZES = {  # parameters of the paper preset (DCGAN: generator + discriminator)
    "cvae": 22.36e6, "dcgan": 3.08e6 + 2.64e6, "ddpm": 7.57e6,
    "cvae-f": 5.56e6, "dcgan-f": 2.56e6 + 2.64e6, "ddpm-f": 4.43e6,
}


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", list(PAPER_SIZES))
def test_paper_preset_runs_end_to_end(tmp_path, family):
    algorithm = "gefl-f" if family.endswith("-f") else "gefl"
    options = {"steps": 10} if family.startswith("ddpm") else {}
    cfg = {**SHORT, "algorithm": algorithm,
           "gefl": {"warmup_rounds": 1, "generator_rounds": 1,
                    "generator": {"family": family, "preset": "paper", "options": options, "local_epochs": 1}}}
    run = tmp_path / "run"
    summary = simulate(cfg, out=run)

    phases = [m["phase"] for m in _metrics(run)]
    assert phases == (["warmup", "generator", "head"] if algorithm == "gefl-f" else ["generator", "train"])
    assert summary["evaluated_rounds"][-1] == len(phases)  # the classifiers trained on generated data were tested
    generator, meta = load_generator(run)
    assert meta["family"] == family
    assert count_parameters(generator) == pytest.approx(PAPER_SIZES[family], rel=0.01)
    samples = generator.sample(torch.arange(4))
    if algorithm == "gefl":
        assert samples.shape == (4, 1, 32, 32) and samples.min() >= -1 and samples.max() <= 1
    else:
        assert samples.shape == (4, 3, 16, 16) and samples.min() >= 0
    # The generator travelled both ways as float16: half its float32 size, every byte counted.
    traffic = summary["bytes_per_client_per_round"]["generator"]
    wire = {k: v.half() if v.is_floating_point() else v for k, v in generator.state_dict().items()}
    assert traffic["up"]["generator"] == traffic["down"]["generator"] == len(encode_state(wire))


def test_avgkd_distils_from_round_two(tmp_path):
    """Round 1 has nothing to distil, so AvgKD trains exactly as FedAvg does; from round 2 each
    client also downloads the other tiers' models and its training targets change."""
    base = {**SHORT, "partition": {"kind": "iid", "samples_per_client": 200}, "rounds": 2}
    kd = simulate({**base, "algorithm": "avgkd"}, out=tmp_path / "kd")
    simulate({**base, "algorithm": "fedavg"}, out=tmp_path / "avg")
    kd_rounds, avg_rounds = _metrics(tmp_path / "kd"), _metrics(tmp_path / "avg")
    assert kd_rounds[0]["accuracy"] == avg_rounds[0]["accuracy"]
    assert kd_rounds[1]["accuracy"] != avg_rounds[1]["accuracy"]
    assert "teachers" not in kd_rounds[0]["bytes"]["down"]
    # Each client's teachers are the other tier's model: the two tiers' model sizes, swapped.
    models = {r["round"]: r["bytes"]["down"] for r in kd_rounds}
    assert models[2]["teachers"] > 0.9 * models[2]["model"]
    assert kd["mean_best_acc"] > 50.0


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """A GeFL-F run and a GeFL run with the small presets, to draw."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for algorithm, family in (("gefl-f", "cvae-f"), ("gefl", "dcgan")):
        cfg = {**SHORT, "algorithm": algorithm, "partition": {"kind": "iid", "samples_per_client": 64},
               "gefl": {"warmup_rounds": 1, "generator_rounds": 2,
                        "generator": {"family": family, "preset": "small", "local_epochs": 1}}}
        simulate(cfg, out=base / algorithm)
        out[algorithm] = base / algorithm
    return out


def test_samples_draws_generated_features_beside_real_ones(small_runs, capsys):
    run = small_runs["gefl-f"]
    assert gefl_main(["samples", str(run), "--per-class", "4"]) == 0
    assert str(run / "samples.png") in capsys.readouterr().out
    picture = np.asarray(Image.open(run / "samples.png").convert("L"), dtype=float)
    # Two panels of 10 rows x 4 columns of 32x32 tiles (16x16 feature maps drawn at 2x), side by side.
    assert picture.shape[0] > 10 * 32 and picture.shape[1] > 2 * 4 * 32
    half = picture.shape[1] // 2
    assert picture[20:, 90:half].std() > 5 and picture[20:, half:].std() > 5  # neither panel is blank


def test_samples_draws_generated_images(small_runs, tmp_path):
    out = tmp_path / "grid.png"
    assert gefl_main(["samples", str(small_runs["gefl"]), "--out", str(out), "--per-class", "3"]) == 0
    width, height = Image.open(out).size
    assert height > 10 * 32 and 3 * 32 < width < 2 * 3 * 34 + 100  # one panel only


def test_samples_names_a_run_without_a_generator(tmp_path, capsys):
    simulate({**SHORT, "algorithm": "fedavg", "partition": {"kind": "iid", "samples_per_client": 16}},
             out=tmp_path / "fedavg")
    assert gefl_main(["samples", str(tmp_path / "fedavg")]) == 2
    assert "generator.safetensors does not exist" in capsys.readouterr().err
