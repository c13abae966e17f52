"""Short real federations on the real Fashion-MNIST."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gefl import simulate
from gefl.algorithms.training import accuracy
from gefl.config import config_from_dict
from gefl.data import load_dataset, validation_indices
from gefl.protocol.wire import encode_state
from gefl.simulation import executor
from gefl.tiers.models import get_model

from netutil import LogLines

BASE = {
    "num_clients": 4,
    "tiers": ["cnn3", "cnn4"],
    "partition": {"kind": "iid", "samples_per_client": 500},
    "eval": {"every": 2},
}


def test_fedavg_learns_well_above_chance_and_writes_the_run_directory(tmp_path):
    summary = simulate({**BASE, "algorithm": "fedavg", "rounds": 3, "train": {"local_epochs": 2}},
                       out=tmp_path / "run")
    assert summary["mean_best_acc"] > 65.0, summary  # chance is 10 %
    for key in ("algorithm", "dataset", "num_clients", "wall_time_s", "tiers", "mean_best_acc", "mean_final_acc"):
        assert key in summary
    assert set(summary["tiers"]) == {"cnn3", "cnn4"}
    assert summary["evaluated_rounds"] == [1, 2, 3]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3] and all("accuracy" in m for m in metrics)
    clients = json.loads((run / "partition.json").read_text())
    assert [c["tier"] for c in clients] == ["cnn3", "cnn4", "cnn3", "cnn4"]
    assert all(sum(c["label_histogram"]) == c["num_samples"] == 500 for c in clients)
    assert "algorithm: fedavg" in (run / "config.yaml").read_text()

    # The saved weights are the evaluated global model: reloading gives the final accuracy.
    test = load_dataset("fashion-mnist").test
    model = get_model("cnn4")
    model.load_state_dict(load_file(run / "weights" / "cnn4.safetensors"))
    assert accuracy(model, test.images, test.labels) == pytest.approx(summary["tiers"]["cnn4"]["final_acc"])


def test_gefl_f_runs_all_three_phases_with_a_frozen_shared_fe(tmp_path):
    cfg = {
        **BASE, "algorithm": "gefl-f", "rounds": 2, "train": {"local_epochs": 1},
        "gefl": {"warmup_rounds": 2, "generator_rounds": 2, "generator": {"local_epochs": 1}},
    }
    summary = simulate(cfg, out=tmp_path / "run")
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["warmup"] * 2 + ["generator"] * 2 + ["head"] * 2
    assert summary["mean_best_acc"] > 50.0, summary
    w3 = load_file(run / "weights" / "cnn3.safetensors")
    w4 = load_file(run / "weights" / "cnn4.safetensors")
    for k in (k for k in w3 if k.startswith("fe.")):
        assert torch.equal(w3[k], w4[k]), f"{k} differs between tiers: the FE must be common"
    gen = load_file(run / "weights" / "generator.safetensors")
    assert any(k.startswith("decoder.") for k in gen)

    # Bytes per client per round, per artifact and direction: the generator travels both ways in its
    # phase, and down (beside the model) in the head phase, as float16 (wire_dtype's default); the
    # sizes are the encoded tensors'.
    traffic = summary["bytes_per_client_per_round"]
    generator_bytes = len(encode_state({k: v.half() if v.is_floating_point() else v for k, v in gen.items()}))
    assert generator_bytes < 0.55 * len(encode_state(gen))
    assert set(traffic) == {"warmup", "generator", "head"}
    assert "generator" not in traffic["warmup"]["down"] and set(traffic["warmup"]["up"]) == {"model"}
    assert traffic["generator"]["up"] == {"generator": generator_bytes}
    assert traffic["generator"]["down"]["generator"] == generator_bytes
    assert traffic["head"]["down"]["generator"] == generator_bytes and set(traffic["head"]["up"]) == {"model"}
    sizes = {t: len(encode_state(load_file(run / "weights" / f"{t}.safetensors"))) for t in ("cnn3", "cnn4")}
    assert traffic["head"]["up"]["model"] == round(sum(sizes.values()) / 2)  # two clients of each tier
    assert all(m["bytes"]["down"]["model"] > 0 for m in metrics)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_gefl_f_class_prior_counts_every_clients_samples(tmp_path, fraction):
    """The class prior's statistics are summed over the clients, so after the generator rounds
    the global generator has counted each class once per sample of every client that has taken
    part, split over the mixture's components; with half the clients per round, that is every
    client of any generator round, not only the last round's."""
    cfg = {
        **BASE, "tiers": ["cnn3"], "algorithm": "gefl-f", "rounds": 1, "train": {"local_epochs": 1},
        "client_fraction": fraction,
        "gefl": {"warmup_rounds": 1, "generator_rounds": 3,
                 "generator": {"local_epochs": 1, "options": {"prior": "class", "prior_components": 3,
                                                                "temperature": 1.5}}},
    }
    summary = simulate(cfg, out=tmp_path / "run")
    gen = load_file(tmp_path / "run" / "weights" / "generator.safetensors")
    clients = json.loads((tmp_path / "run" / "partition.json").read_text())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [set(m["participants"]) for m in metrics if m["phase"] == "generator"]
    taken_part = set().union(*rounds)
    if fraction < 1.0:  # the seed gives rounds of different pairs, so the last one is not everyone
        assert all(len(r) == 2 for r in rounds) and len(taken_part) > 2
    histogram = torch.tensor([c["label_histogram"] for c in clients if c["client"] in taken_part],
                             dtype=torch.float32).sum(0)
    assert gen["stats.count"].shape == (10, 3)
    assert torch.allclose(gen["stats.count"].sum(1), histogram, atol=1e-3)
    assert summary["mean_best_acc"] > 50.0, summary


def test_accuracy_on_the_validation_split_is_that_of_the_saved_weights(tmp_path):
    """`eval.split: validation` scores the models on training images no client holds, and says so."""
    cfg = {**BASE, "algorithm": "fedavg", "rounds": 1, "train": {"local_epochs": 1},
           "eval": {"every": 1, "split": "validation", "validation_size": 2000}}
    summary = simulate(cfg, out=tmp_path / "run")
    assert summary["eval_split"] == "validation"
    dataset = load_dataset("fashion-mnist")
    held = validation_indices(config_from_dict(cfg), dataset.train.labels.numpy())
    validation = dataset.train.subset(held)
    model = get_model("cnn4")
    model.load_state_dict(load_file(tmp_path / "run" / "weights" / "cnn4.safetensors"))
    final = summary["tiers"]["cnn4"]["final_acc"]
    assert accuracy(model, validation.images, validation.labels) == pytest.approx(final)
    assert accuracy(model, dataset.test.images, dataset.test.labels) != pytest.approx(final)


def test_fedprox_and_lg_fedavg_run(tmp_path):
    for algo in ("fedprox", "lg-fedavg"):
        summary = simulate({**BASE, "algorithm": algo, "rounds": 3, "train": {"local_epochs": 1}, "workers": 1},
                           out=tmp_path / algo)
        assert summary["algorithm"] == algo and summary["mean_best_acc"] > 45.0, summary


def test_same_seed_same_result_in_worker_processes_or_in_this_one(tmp_path, monkeypatch):
    """Where forked workers could not train (PyTorch refuses autograd in a child forked after the
    parent set its engine up), the clients run in this process instead: same results, and a
    warning that says why. The pool's run is a fresh `gefl simulate` process, as a user starts it:
    this test process may already have set autograd up in an earlier test."""
    cfg = {**BASE, "num_clients": 2, "algorithm": "fedavg", "rounds": 1, "train": {"local_epochs": 1}, "workers": 2}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    pool = subprocess.run([sys.executable, "-m", "gefl.cli", "simulate", "--config", str(config),
                           "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert pool.returncode == 0, pool.stderr
    assert "2 worker(s) on cpu" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    monkeypatch.setattr(executor, "forked_children_can_train", lambda: False)
    lines = LogLines()
    try:
        c = simulate(cfg, out=tmp_path / "c")
    finally:
        lines.close()
    assert c["tiers"] == a["tiers"]
    assert any("running the clients in this process instead of 2 worker processes" in line for line in lines)
    assert any("2 clients, " in line and "1 worker(s) on cpu" in line for line in lines)


def test_the_same_weights_are_written_as_the_same_bytes(tmp_path):
    # safetensors keeps metadata in a hash map whose order changes from one save to the next:
    # without a canonical header, two identical runs write weight files that differ.
    from types import SimpleNamespace

    from gefl.algorithms import GlobalState
    from gefl.config import config_from_dict
    from gefl.rounds.rundir import RunDir, load_generator, load_tier

    cfg = config_from_dict({**BASE, "algorithm": "gefl-f"})
    dataset = SimpleNamespace(name="fashion-mnist", in_channels=1, num_classes=10, classes=[str(i) for i in range(10)])
    torch.manual_seed(0)
    state = GlobalState({t: get_model(t).state_dict() for t in ("cnn4", "cnn3")})
    from gefl.algorithms import generated_shape
    from gefl.generators import build_generator, generator_spec

    g = cfg.gefl.generator
    spec = generator_spec(g.family)
    state.generator = build_generator(spec.family, generated_shape(spec.level, 1), 10, g.preset, g.options).state_dict()
    runs = [RunDir.create(tmp_path / f"run{i}", cfg) for i in range(2)]
    for run in runs:
        run.save_weights(state, dataset, cfg)
    names = sorted(p.name for p in (runs[0].path / "weights").iterdir())
    assert names == ["cnn3.safetensors", "cnn4.safetensors", "generator.safetensors"]
    for name in names:
        assert (runs[0].path / "weights" / name).read_bytes() == (runs[1].path / "weights" / name).read_bytes(), name
    model, meta = load_tier(runs[0].path, "cnn4")
    assert meta["tier"] == "cnn4" and meta["num_classes"] == "10"
    assert all(torch.equal(v, state.models["cnn4"][k]) for k, v in model.state_dict().items())
    load_generator(runs[0].path, g.family)
