import torch

from gefl.algorithms.training import train_epochs
from gefl.config import TrainConfig
from gefl.tiers.models import get_model


def drift(mu: float) -> float:
    torch.manual_seed(0)
    model = get_model("cnn2")
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
    cfg = TrainConfig(lr=0.02, batch_size=16, local_epochs=5)
    train_epochs(model, x, y, cfg, torch.Generator().manual_seed(0), prox_mu=mu)
    return sum((p - s).pow(2).sum().item() for p, s in zip(model.parameters(), start)) ** 0.5


def test_fedprox_term_holds_weights_near_the_global_model():
    free, held = drift(0.0), drift(25.0)  # 40 steps; the pull back halves the drift each step
    assert held < 0.5 * free


def test_training_is_reproducible_from_its_seed():
    assert drift(0.0) == drift(0.0)


def test_a_lone_last_sample_does_not_break_batchnorm(fmnist):
    """65 samples at batch 64 leave one sample over; mobilenet-v3-small pools to 1x1 before its BN."""
    model = get_model("mobilenet-v3-small")
    loss = train_epochs(model, fmnist.train.images[:65], fmnist.train.labels[:65], TrainConfig(local_epochs=1),
                        torch.Generator().manual_seed(0))
    assert loss == loss and loss > 0  # finite, not NaN
