"""gefl.optim's SGD and Adam step exactly as torch.optim's do (so every figure measured with
torch.optim still holds), and a training client imports no torch._dynamo through them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gefl.optim import SGD, Adam
from gefl.tiers.models import get_model


def _steps(make_optimizer, steps: int = 6, skip_head_every: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = get_model("cnn3").train()
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(16, 1, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if skip_head_every and i % skip_head_every == 0:
            for p in model.head.parameters():  # some parameters without a gradient in some steps (DCGAN)
                p.grad = None
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("ours", "theirs"), [
    (lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (lambda p: SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    (lambda p: Adam(p, lr=2e-3, betas=(0.5, 0.999), weight_decay=1e-4),
     lambda p: torch.optim.Adam(p, lr=2e-3, betas=(0.5, 0.999), weight_decay=1e-4)),
])
@pytest.mark.parametrize("skip", [0, 2])
def test_steps_are_bit_for_bit_torch_optims(ours, theirs, skip):
    for a, b in zip(_steps(ours, skip_head_every=skip), _steps(theirs, skip_head_every=skip)):
        assert torch.equal(a, b)


def test_local_training_does_not_import_the_compiler():
    code = ("import sys, torch; from gefl.config import TrainConfig; "
            "from gefl.algorithms.training import train_epochs; "
            "from gefl.tiers.models import get_model; m = get_model('cnn3c'); "
            "train_epochs(m, torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,)), TrainConfig(local_epochs=1), "
            "torch.Generator().manual_seed(0)); print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
