import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import gefl
from gefl.config import Config
from gefl.errors import GeflError
from gefl.tiers.models import OPT_IN_TIERS, count_parameters, get_model, list_tiers, register_tier

PAPER_COUNTS = {
    "cnn2": 10_766, "cnn3": 10_350, "cnn3b": 14_366, "cnn3c": 5_406, "cnn4": 26_414,
    "cnn4b": 40_206, "cnn4c": 11_126, "cnn5": 99_246, "cnn5b": 110_306, "cnn5c": 104_334,
}


@pytest.mark.parametrize("tier", list(PAPER_COUNTS))
def test_parameter_counts_match_the_paper(tier):
    model = get_model(tier)
    assert count_parameters(model) == PAPER_COUNTS[tier]
    assert count_parameters(model.fe) == 36  # the common FE for 1-channel input


def test_paper_tiers_come_first_in_paper_order():
    assert list_tiers()[:10] == list(PAPER_COUNTS)


def test_fe_maps_32x32_images_to_3x16x16_features_and_heads_to_logits():
    model = get_model("cnn4", in_channels=3, num_classes=7)
    x = torch.randn(5, 3, 32, 32)
    feats = model.fe(x)
    assert feats.shape == (5, 3, 16, 16)
    assert (feats >= 0).all()  # ReLU then max-pool
    assert model(x).shape == (5, 7)
    assert torch.allclose(model.head(feats), model(x))


def test_unknown_tier_lists_the_valid_ones():
    with pytest.raises(GeflError) as err:
        get_model("cnn9")
    assert "unknown tier 'cnn9'" in str(err.value) and "cnn5c" in str(err.value)


def test_registering_a_custom_tier_builds_it_behind_the_common_fe():
    register_tier("test-mlp", lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes)))
    model = get_model("test-mlp")
    assert count_parameters(model) == 36 + 768 * 10 + 10
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # a user's own tier registered again is replaced
    register_tier("test-mlp", lambda n: nn.Sequential(nn.Flatten(), nn.Linear(768, n, bias=False)))
    assert count_parameters(get_model("test-mlp")) == 36 + 768 * 10
    assert list_tiers().count("test-mlp") == 1
    with pytest.raises(GeflError, match="tier 'cnn3' is built in; pick another name"):
        register_tier("cnn3", lambda n: nn.Identity())


# --------------------------------------------------------------------------- the opt-in torchvision tiers

OPT_IN_PARAMS = {"mobilenet-v3-small": (1.45e6, 1.60e6), "resnet18": (11.0e6, 11.3e6)}
"""torchvision's counts with a 10-class classifier (~1.53 M and ~11.17 M) plus the 36 of the FE."""


def test_opt_in_tiers_follow_the_paper_tiers_and_no_default_or_shipped_config_lists_them():
    assert list_tiers()[10:12] == list(OPT_IN_TIERS) == list(OPT_IN_PARAMS)
    assert not set(OPT_IN_TIERS) & set(Config().tiers)
    configs = Path(__file__).resolve().parent.parent / "configs"
    for f in configs.rglob("*.yaml"):
        listed = (yaml.safe_load(f.read_text()) or {}).get("tiers")
        if isinstance(listed, list):  # a federation config (configs/tiers.yaml maps tiers to costs)
            assert not set(OPT_IN_TIERS) & set(listed), f


@pytest.mark.parametrize("tier", OPT_IN_TIERS)
def test_opt_in_tier_builds_behind_the_common_fe(tier):
    model = get_model(tier)
    lo, hi = OPT_IN_PARAMS[tier]
    assert lo < count_parameters(model) < hi
    assert count_parameters(model.fe) == 36
    x = torch.randn(4, 1, 32, 32)
    assert model(x).shape == (4, 10)
    assert get_model(tier, in_channels=3, num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_opt_in_tiers_keep_spatial_extent_down_to_their_last_stage():
    feats = torch.randn(2, 3, 16, 16)
    mobilenet = get_model("mobilenet-v3-small").head
    assert mobilenet.features(feats).shape == (2, 576, 1, 1)  # stride-1 stem: 16 -> 8 -> 4 -> 2 -> 1
    resnet = get_model("resnet18").head
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("layer1", "layer4"):
        getattr(resnet, name).register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape))
    resnet(feats)
    assert seen == {"layer1": (2, 64, 16, 16), "layer4": (2, 512, 2, 2)}


@pytest.mark.parametrize("tier", OPT_IN_TIERS)
def test_one_sgd_step_on_real_fashion_mnist_stays_finite(fmnist, tier):
    model = get_model(tier)
    model.train()
    x, y = fmnist.train.images[:64], fmnist.train.labels[:64]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert torch.isfinite(F.cross_entropy(model(x), y))


def test_a_federation_with_an_opt_in_tier_reports_both_tiers(fmnist, tmp_path):
    summary = gefl.simulate(
        {"algorithm": "fedavg", "num_clients": 2, "tiers": ["cnn3", "mobilenet-v3-small"], "rounds": 1,
         "partition": {"samples_per_client": 200}, "eval": {"every": 1}},
        out=tmp_path / "run",
    )
    assert set(summary["tiers"]) == {"cnn3", "mobilenet-v3-small"}
    assert summary["tiers"]["mobilenet-v3-small"]["params"] == count_parameters(get_model("mobilenet-v3-small"))
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(record["accuracy"]) == {"cnn3", "mobilenet-v3-small"}
    for tier, acc in record["accuracy"].items():
        assert 0.0 < acc <= 100.0 and acc == summary["tiers"][tier]["final_acc"]
    assert summary["tiers"]["cnn3"]["best_acc"] > 20.0  # chance is 10 %
    assert (tmp_path / "run" / "weights" / "mobilenet-v3-small.safetensors").is_file()
