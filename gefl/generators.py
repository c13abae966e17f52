"""Conditional generators of FE features (GeFL-F), behind a registry.

A generator is an `nn.Module` that knows how to compute its own training loss on a batch of
real features and labels (`loss`) and how to draw labelled samples (`sample`). The training loop
and the federation never look inside, so another family only has to implement those two methods
and register a factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gefl.errors import GeflError, unknown_name


class FeatureGenerator(nn.Module):
    """Interface of every generator family."""

    family: str = ""

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """Features for the given labels, on the real features' range (non-negative: FE ends in ReLU)."""
        raise NotImplementedError


class CVAEF(FeatureGenerator):
    """Conditional VAE over FE features (C x S x S, S a power of two).

    The encoder sees the features with the label as one-hot planes; the decoder sees the latent
    code with the one-hot label. Each stage halves (encoder) or doubles (decoder) the spatial size
    with a 4x4 stride-2 convolution, so `widths` sets both depth and width. The output goes
    through ReLU because real features are post-ReLU: exact zeros are common and negatives never
    occur. The loss is the reference's: summed squared error plus the KL term, per sample.
    """

    family = "cvae-f"

    def __init__(
        self,
        feature_shape: Sequence[int] = (3, 16, 16),
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        latent: int = 16,
    ) -> None:
        super().__init__()
        channels, size, _ = feature_shape
        if size % (2 ** len(widths)):
            raise GeflError(f"cvae-f: {len(widths)} stages do not fit a {size}x{size} feature map")
        self.feature_shape = tuple(feature_shape)
        self.num_classes = num_classes
        self.latent = latent
        self.bottom = size // 2 ** len(widths)
        enc: list[nn.Module] = []
        c_in = channels + num_classes
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = widths[-1] * self.bottom**2
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.project = nn.Linear(latent + num_classes, flat)
        dec: list[nn.Module] = []
        rev = list(widths[::-1])
        for w_in, w_out in zip(rev, rev[1:]):
            dec += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.ReLU()]
        dec += [nn.ConvTranspose2d(rev[-1], channels, 4, 2, 1), nn.ReLU()]
        self.decoder = nn.Sequential(*dec)
        self._top = widths[-1]

    def _decode(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.project(torch.cat([z, onehot], dim=1)))
        return self.decoder(h.view(-1, self._top, self.bottom, self.bottom))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(features.dtype)
        planes = onehot[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        h = self.encoder(torch.cat([features, planes], dim=1))
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self._decode(z, onehot)
        n = features.shape[0]
        recon_loss = F.mse_loss(recon, features, reduction="sum") / n
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
        return recon_loss + kld

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).float()
        z = torch.randn(labels.shape[0], self.latent, device=labels.device)
        return self._decode(z, onehot)


@dataclass(frozen=True)
class GeneratorSpec:
    family: str
    build: Callable[..., FeatureGenerator]
    presets: dict[str, dict]


_GENERATORS: dict[str, GeneratorSpec] = {}


def register_generator(family: str, build: Callable[..., FeatureGenerator], presets: dict[str, dict]) -> None:
    """Add a generator family; `build(feature_shape=, num_classes=, **preset_or_options)`."""
    if family in _GENERATORS:
        raise GeflError(f"generator family {family!r} is already registered")
    _GENERATORS[family] = GeneratorSpec(family, build, presets)


def list_generators() -> list[str]:
    return list(_GENERATORS)


def build_generator(
    family: str,
    feature_shape: Sequence[int],
    num_classes: int,
    preset: str | None = None,
    **options: object,
) -> FeatureGenerator:
    """A fresh generator; `options` (for example widths, latent) override the preset's values."""
    spec = _GENERATORS.get(family)
    if spec is None:
        raise unknown_name("generator family", family, _GENERATORS)
    kwargs: dict = {}
    if preset is not None:
        if preset not in spec.presets:
            raise unknown_name(f"{family} preset", preset, spec.presets)
        kwargs.update(spec.presets[preset])
    kwargs.update({k: v for k, v in options.items() if v is not None})
    try:
        return spec.build(feature_shape=tuple(feature_shape), num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise GeflError(f"generator {family!r}: bad option ({exc})") from exc


register_generator(
    "cvae-f",
    CVAEF,
    presets={
        # The reference code's CVAE-F: four stages 64-128-256-512 down to 1x1, about 5.5 M parameters.
        "paper": {"widths": (64, 128, 256, 512), "latent": 16},
        # Three stages at a quarter of the width; trains in minutes on a 2-core CPU.
        "small": {"widths": (32, 64, 128), "latent": 16},
    },
)
