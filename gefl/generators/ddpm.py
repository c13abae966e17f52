"""Conditional DDPM with classifier-free guidance (the paper's DDPM and DDPM-F)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gefl.generators.base import FEATURE, IMAGE, Generator, register_generator


class _Block(nn.Module):
    """Two 3x3 conv + BN + GELU; with `residual`, the output is the scaled sum of both stages."""

    def __init__(self, c_in: int, c_out: int, residual: bool = False) -> None:
        super().__init__()
        self.one = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())
        self.two = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.one(x)
        out = self.two(h)
        return (h + out) / 1.414 if self.residual else out


def _embed(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, c_out), nn.GELU(), nn.Linear(c_out, c_out))


class _UNet(nn.Module):
    """The reference's small context U-Net: two down stages, a 1x1 bottleneck, two up stages.
    Time and class enter each up stage as h * class_embedding + time_embedding."""

    def __init__(self, channels: int, size: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = _Block(channels, width, residual=True)
        self.down1 = nn.Sequential(_Block(width, width), nn.MaxPool2d(2))
        self.down2 = nn.Sequential(_Block(width, 2 * width), nn.MaxPool2d(2))
        self.to_vec = nn.Sequential(nn.AvgPool2d(size // 4), nn.GELU())
        self.t1, self.t2 = _embed(1, 2 * width), _embed(1, width)
        self.c1, self.c2 = _embed(num_classes, 2 * width), _embed(num_classes, width)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * width, 2 * width, size // 4, size // 4),
                                 nn.GroupNorm(8, 2 * width), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(4 * width, width, 2, 2), _Block(width, width), _Block(width, width))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 2, 2), _Block(width, width), _Block(width, width))
        self.out = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), nn.GroupNorm(8, width), nn.ReLU(),
                                 nn.Conv2d(width, channels, 3, 1, 1))
        self.width = width

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        d1 = self.down1(x0)
        d2 = self.down2(d1)
        h = self.up0(self.to_vec(d2))
        t = t.view(-1, 1)
        h = self.up1(torch.cat([self.c1(context)[:, :, None, None] * h + self.t1(t)[:, :, None, None], d2], dim=1))
        h = self.up2(torch.cat([self.c2(context)[:, :, None, None] * h + self.t2(t)[:, :, None, None], d1], dim=1))
        return self.out(torch.cat([h, x0], dim=1))


class DDPM(Generator):
    """Denoising diffusion over C x S x S data, conditioned on the class, with classifier-free guidance.

    Training: the label is dropped (all-zero context) with probability `drop_prob`, so one network
    learns both the conditional and the unconditional noise. Sampling runs all `steps` reverse
    steps; with guidance weight `w` > 0 the noise estimate is (1 + w) * conditional - w *
    unconditional (w = 0, the paper's runs, skips the unconditional half). Linear betas from 1e-4
    to 0.02 as in the reference.

    Sampling costs one network pass per reverse step and batch, which is what makes DDPM the
    slowest family by far on a CPU (and on an edge board, where the head rounds sample). With
    `sample_steps` below `steps` the reverse chain visits only that many of the trained steps,
    evenly spaced, each with the beta that carries one visited step's noise level to the next
    (1 - alpha_bar[t] / alpha_bar[t_prev], "respacing"): the same network, fewer passes. With
    `sample_steps` equal to `steps` (the default) that beta is the trained one and the chain is the
    full DDPM sampler.
    """

    family = "ddpm"

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        level: str,
        width: int = 32,
        steps: int = 200,
        guidance: float = 0.0,
        drop_prob: float = 0.1,
        sample_steps: int | None = None,
    ) -> None:
        super().__init__(data_shape, num_classes, level)
        channels, size, _ = data_shape
        if size % 4 or width % 8:
            raise ValueError(f"DDPM needs a size divisible by 4 (got {size}) and a width divisible by 8 (got {width})")
        if steps < 1 or not 0 <= drop_prob < 1 or guidance < 0:
            raise ValueError("DDPM needs steps >= 1, 0 <= drop_prob < 1 and guidance >= 0")
        sample_steps = steps if sample_steps is None else sample_steps
        if not 1 <= sample_steps <= steps:
            raise ValueError(f"DDPM needs 1 <= sample_steps <= steps ({steps}), got {sample_steps}")
        self.net = _UNet(channels, size, num_classes, width)
        self.steps, self.guidance, self.drop_prob = steps, guidance, drop_prob
        betas = torch.linspace(1e-4, 0.02, steps + 1)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        # Schedules are buffers that are not saved: they follow from `steps`, not from training.
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        # The reverse chain's steps, highest first, and for each the beta that takes its noise level
        # to the next visited step's (step 0 after the last). All steps visited: the trained betas.
        spacing = (steps - 1) / max(sample_steps - 1, 1)
        visited = torch.tensor([round(steps - i * spacing) for i in range(sample_steps)], dtype=torch.long)
        if sample_steps == steps:
            chain_betas = betas[visited]
        else:
            below = torch.cat([visited[1:], torch.zeros(1, dtype=torch.long)])
            chain_betas = 1 - alpha_bar[visited] / alpha_bar[below]
        self.register_buffer("chain_steps", visited, persistent=False)
        self.register_buffer("chain_betas", chain_betas, persistent=False)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.randint(1, self.steps + 1, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        context = F.one_hot(labels, self.num_classes).to(x.dtype)
        keep = (torch.rand(x.shape[0], 1, device=x.device) >= self.drop_prob).to(x.dtype)
        return F.mse_loss(self.net(x_t, context * keep, t.to(x.dtype) / self.steps), noise)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        n = labels.shape[0]
        context = F.one_hot(labels, self.num_classes).float()
        x = torch.randn(n, *self.data_shape, device=labels.device)
        guided = self.guidance > 0
        if guided:
            context = torch.cat([context, torch.zeros_like(context)])
        last = len(self.chain_steps) - 1
        for i, (step, beta) in enumerate(zip(self.chain_steps.tolist(), self.chain_betas, strict=True)):
            t = torch.full((len(context),), step / self.steps, device=labels.device)
            eps = self.net(torch.cat([x, x]) if guided else x, context, t)
            if guided:
                eps = (1 + self.guidance) * eps[:n] - self.guidance * eps[n:]
            x = (x - eps * beta / (1 - self.alpha_bar[step]).sqrt()) / (1 - beta).sqrt()
            if i < last:
                x = x + beta.sqrt() * torch.randn_like(x)
        return self.clamp_range(x)


class DDPMF(DDPM):
    family = "ddpm-f"


register_generator("ddpm", IMAGE, DDPM, presets={
    # The reference's 32x32 DDPM: width 128, 200 steps, about 7.57 M parameters; w = 0 as in its runs.
    "paper": {"width": 128, "steps": 200, "guidance": 0.0},
    "small": {"width": 32, "steps": 100, "guidance": 0.0},
})
register_generator("ddpm-f", FEATURE, DDPMF, presets={
    # The reference's DDPM-F: width 128, 500 steps, about 4.43 M parameters.
    "paper": {"width": 128, "steps": 500, "guidance": 0.0},
    "small": {"width": 32, "steps": 100, "guidance": 0.0},
})
