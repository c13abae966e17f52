"""Conditional DCGAN (the paper's DCGAN and DCGAN-F): a generator and a discriminator, both federated."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gefl.generators.base import FEATURE, IMAGE, Generator, register_generator
from gefl.optim import Adam


def _init(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(Generator):
    """Conditional DCGAN over C x S x S data.

    Generator: the noise and the one-hot label each go through a 4x4 transposed convolution to
    `g_widths[0]` channels at 4x4; concatenated, they are doubled in size by 4x4 stride-2
    transposed convolutions through `g_widths[1:]` up to S x S and C channels. Discriminator: the
    data and the label as one-hot planes each through a stride-2 convolution to `d_widths[0] / 2`
    channels, concatenated, then stride-2 convolutions through `d_widths[1:]` down to 2x2 or 4x4
    and a last convolution to one logit. Leaky ReLU in the discriminator and the feature
    generator, BatchNorm after every inner layer, as in the reference. One optimizer holds both
    networks: each step computes gradients for one of them only.
    """

    family = "dcgan"

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        level: str,
        noise: int = 100,
        g_widths: Sequence[int] = (64, 64, 32),
        d_widths: Sequence[int] = (32, 64, 128),
    ) -> None:
        super().__init__(data_shape, num_classes, level)
        channels, size, _ = data_shape
        if size != 4 * 2 ** len(g_widths) or size % 2 ** len(d_widths):
            raise ValueError(f"g_widths {list(g_widths)} / d_widths {list(d_widths)} do not fit a {size}x{size} "
                             f"input: the generator needs size = 4 * 2^len(g_widths)")
        self.noise = noise
        act: type[nn.Module] = nn.ReLU if level == IMAGE else nn.LeakyReLU
        self.g_noise = nn.Sequential(nn.ConvTranspose2d(noise, g_widths[0], 4, 1, 0),
                                     nn.BatchNorm2d(g_widths[0]), act())
        self.g_label = nn.Sequential(nn.ConvTranspose2d(num_classes, g_widths[0], 4, 1, 0),
                                     nn.BatchNorm2d(g_widths[0]), act())
        g: list[nn.Module] = []
        c_in = 2 * g_widths[0]
        for w in g_widths[1:]:
            g += [nn.ConvTranspose2d(c_in, w, 4, 2, 1), nn.BatchNorm2d(w), act()]
            c_in = w
        g.append(nn.ConvTranspose2d(c_in, channels, 4, 2, 1))
        self.g_body = nn.Sequential(*g)
        half = d_widths[0] // 2
        self.d_data = nn.Sequential(nn.Conv2d(channels, half, 4, 2, 1), nn.LeakyReLU(0.2))
        self.d_label = nn.Sequential(nn.Conv2d(num_classes, half, 4, 2, 1), nn.LeakyReLU(0.2))
        d: list[nn.Module] = []
        c_in = 2 * half
        for w in d_widths[1:]:
            d += [nn.Conv2d(c_in, w, 4, 2, 1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            c_in = w
        last = size // 2 ** len(d_widths)
        d.append(nn.Conv2d(c_in, 1, last, 1, 0))
        self.d_body = nn.Sequential(*d)
        self.apply(_init)

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("g_")]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith("d_")]

    def _generate(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).float()[:, :, None, None]
        z = torch.randn(labels.shape[0], self.noise, 1, 1, device=labels.device)
        h = torch.cat([self.g_noise(z), self.g_label(onehot)], dim=1)
        return self.to_range(self.g_body(h))

    def _logit(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        planes = F.one_hot(labels, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return self.d_body(torch.cat([self.d_data(x), self.d_label(planes)], dim=1)).flatten()

    def train_step(self, x: torch.Tensor, labels: torch.Tensor, optimizer: Adam) -> float:
        """One discriminator step (real vs generated), then one non-saturating generator step."""
        real = torch.ones(x.shape[0], device=x.device)
        fake_labels = torch.randint(self.num_classes, labels.shape, device=x.device)
        fake = self._generate(fake_labels)
        d_loss = (F.binary_cross_entropy_with_logits(self._logit(x, labels), real)
                  + F.binary_cross_entropy_with_logits(self._logit(fake.detach(), fake_labels), 0 * real))
        optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        optimizer.step()  # only the discriminator has gradients here
        g_loss = F.binary_cross_entropy_with_logits(self._logit(fake, fake_labels), real)
        optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        for p in self.discriminator_parameters():
            p.grad = None  # the generator's objective must not move the discriminator
        optimizer.step()
        return float(d_loss.item() + g_loss.item())

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss (for measuring cost; training uses `train_step`)."""
        fake_labels = torch.randint(self.num_classes, labels.shape, device=x.device)
        return F.binary_cross_entropy_with_logits(self._logit(self._generate(fake_labels), fake_labels),
                                                  torch.ones(x.shape[0], device=x.device))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        return self._generate(labels)


class DCGANF(DCGAN):
    family = "dcgan-f"


register_generator("dcgan", IMAGE, DCGAN, presets={
    # The reference's 32x32 DCGAN (d=128): G about 3.08 M, D about 2.64 M parameters.
    "paper": {"noise": 100, "g_widths": (256, 256, 128), "d_widths": (128, 256, 512)},
    "small": {"noise": 100, "g_widths": (64, 64, 32), "d_widths": (32, 64, 128)},
})
register_generator("dcgan-f", FEATURE, DCGANF, presets={
    # The reference's DCGAN-F: G 2.56 M parameters used in its forward pass (the paper's 3.1 M also
    # counts two layers the reference defines and never calls), D about 2.64 M.
    "paper": {"noise": 100, "g_widths": (256, 256), "d_widths": (128, 256, 512)},
    "small": {"noise": 100, "g_widths": (64, 64), "d_widths": (32, 64, 128)},
})
