import pytest
import torch
from torch import nn

from gefl.errors import GeflError
from gefl.models import count_parameters, get_model, list_tiers, register_tier

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
    with pytest.raises(GeflError, match="already registered"):
        register_tier("test-mlp", lambda n: nn.Identity())
