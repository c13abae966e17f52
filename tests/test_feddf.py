"""FedDF: its public set, its server-side distillation, and a short federation on Fashion-MNIST."""

import json

import numpy as np
import pytest
import torch

from gefl import simulate
from gefl.algorithms import TRAIN, ClientResult, GlobalState, make_algorithm
from gefl.algorithms.training import predict_logits, train_epochs
from gefl.config import config_from_dict
from gefl.data import client_indices, load_dataset, public_indices
from gefl.errors import GeflError
from gefl.protocol.wire import encode_state
from gefl.tiers.models import get_model

TIERS = ["cnn3c", "cnn4c"]


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist")


def test_public_set_is_images_no_client_holds(fmnist):
    cfg = config_from_dict({"algorithm": "feddf", "feddf": {"public_size": 3000}})
    public = public_indices(cfg, fmnist)
    held = np.concatenate(client_indices(cfg, fmnist.train.labels.numpy()))
    assert len(public) == len(set(public.tolist())) == 3000
    assert not set(public.tolist()) & set(held.tolist())
    assert np.array_equal(public, public_indices(cfg, fmnist))  # the seed fixes it
    other_seed = config_from_dict({"algorithm": "feddf", "seed": 1, "feddf": {"public_size": 3000}})
    assert not np.array_equal(public, public_indices(other_seed, fmnist))


def test_public_set_larger_than_what_no_client_holds_says_so(fmnist):
    cfg = config_from_dict({"algorithm": "feddf", "partition": {"kind": "iid", "samples_per_client": 5900},
                            "feddf": {"public_size": 5000}})
    with pytest.raises(GeflError, match="public_size is 5000, but only 1000 training images of fashion-mnist"):
        public_indices(cfg, fmnist)


def test_unknown_public_dataset_fails_when_the_config_is_read():
    with pytest.raises(GeflError, match="unknown dataset 'imagenet'"):
        config_from_dict({"algorithm": "feddf", "feddf": {"public_dataset": "imagenet"}})


def _model(tier, state_dict):
    model = get_model(tier, 1, 10)
    model.load_state_dict(state_dict)
    return model


def test_aggregate_distils_each_tier_towards_the_ensemble(fmnist):
    """After the per-architecture average, each tier's model is trained towards the mean logits
    of all the round's client models: its KL divergence to that ensemble on the public set falls."""
    cfg = config_from_dict({"algorithm": "feddf", "tiers": TIERS, "num_clients": 2,
                            "feddf": {"public_size": 512, "steps": 30}})
    algo = make_algorithm(cfg)
    torch.manual_seed(0)
    clients = {}
    for i, t in enumerate(TIERS):  # each tier trained on different real images, so they disagree
        model = _model(t, algo.init_state(TIERS, 1, 10).models[t])
        train_epochs(model, fmnist.train.images[i * 300: (i + 1) * 300], fmnist.train.labels[i * 300: (i + 1) * 300],
                     cfg.train, torch.Generator().manual_seed(i))
        clients[t] = model.state_dict()
    results = [ClientResult(i, t, TRAIN, encode_state(clients[t]), 600, 0.0) for i, t in enumerate(TIERS)]
    new = algo.aggregate(TRAIN, GlobalState(clients), results)
    public = fmnist.train.images[torch.from_numpy(public_indices(cfg, fmnist))]
    ensemble = torch.softmax(torch.stack([predict_logits(_model(t, clients[t]), public) for t in TIERS]).mean(0), 1)

    def divergence(tier, state_dict):
        log_probs = torch.log_softmax(predict_logits(_model(tier, state_dict), public), 1)
        return torch.nn.functional.kl_div(log_probs, ensemble, reduction="batchmean").item()

    for t in TIERS:
        before, after = divergence(t, clients[t]), divergence(t, new.models[t])
        assert after < 0.5 * before, (t, before, after)
        assert new.models[t].keys() == clients[t].keys()


def test_feddf_federation_differs_from_fedavg_from_round_one(tmp_path):
    base = {"num_clients": 2, "tiers": TIERS, "rounds": 2, "partition": {"kind": "iid", "samples_per_client": 300},
            "train": {"local_epochs": 2}, "eval": {"every": 1}, "workers": 1,
            "feddf": {"public_size": 1000, "steps": 20}}
    df = simulate({**base, "algorithm": "feddf"}, out=tmp_path / "df")
    simulate({**base, "algorithm": "fedavg"}, out=tmp_path / "avg")
    rounds = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("df", "avg")}
    assert rounds["df"][0]["accuracy"] != rounds["avg"][0]["accuracy"]
    assert df["mean_best_acc"] > 50.0  # distilled from an ensemble of two weak models, not wrecked
