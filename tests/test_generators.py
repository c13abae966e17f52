import pytest
import torch

from gefl.errors import GeflError
from gefl.generators import build_generator
from gefl.models import count_parameters


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_cvae_f_samples_have_the_feature_shape_and_range(preset):
    gen = build_generator("cvae-f", (3, 16, 16), 10, preset).eval()
    labels = torch.arange(10).repeat(3)
    with torch.no_grad():
        out = gen.sample(labels)
    assert out.shape == (30, 3, 16, 16)
    assert torch.isfinite(out).all()
    assert (out >= 0).all(), "real FE features are post-ReLU, generated ones must be too"


def test_paper_preset_is_the_papers_size():
    n = count_parameters(build_generator("cvae-f", (3, 16, 16), 10, "paper"))
    assert 5.4e6 < n < 5.7e6


def test_cvae_f_learns_class_conditional_features():
    """Two classes with different constant feature maps: after training, samples of each class
    must be closer to their own class's map than to the other's."""
    torch.manual_seed(0)
    gen = build_generator("cvae-f", (3, 16, 16), 2, "small", latent=4)
    feats = torch.cat([torch.full((64, 3, 16, 16), 0.2), torch.full((64, 3, 16, 16), 1.5)])
    feats = feats + 0.05 * torch.rand_like(feats)
    labels = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = gen.loss(feats, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    gen.eval()
    with torch.no_grad():
        s0 = gen.sample(torch.zeros(32, dtype=torch.long)).mean().item()
        s1 = gen.sample(torch.ones(32, dtype=torch.long)).mean().item()
    assert abs(s0 - 0.22) < abs(s0 - 1.52) and abs(s1 - 1.52) < abs(s1 - 0.22)


def test_unknown_family_and_preset_fail_with_the_valid_names():
    with pytest.raises(GeflError, match="unknown generator family 'gan'.*cvae-f"):
        build_generator("gan", (3, 16, 16), 10)
    with pytest.raises(GeflError, match="unknown cvae-f preset 'huge'.*paper, small"):
        build_generator("cvae-f", (3, 16, 16), 10, "huge")
    with pytest.raises(GeflError, match="do not fit"):
        build_generator("cvae-f", (3, 16, 16), 10, widths=[8, 8, 8, 8, 8])
