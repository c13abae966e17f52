"""Conditional VAE (the paper's CVAE and CVAE-F), and the lightweight feature generator's base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gefl.generators import FEATURE, IMAGE, Generator, register_generator


class ClassLatentStats(nn.Module):
    """Per-class sufficient statistics of the encoder's posterior codes on the clients' data: how
    many codes, their sum, and the sum of their second moments (mu mu^T + diag(sigma^2), so the
    aggregate posterior's spread, not only that of the means). The aggregator adds them up over
    the round's clients, so the mean and covariance read back are exactly those of the pooled
    codes, with no extra round and no code of a single sample leaving a client."""

    def __init__(self, num_classes: int, latent: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("sum", torch.zeros(num_classes, latent))
        self.register_buffer("moment", torch.zeros(num_classes, latent, latent))

    @torch.no_grad()
    def record(self, mu: torch.Tensor, logvar: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace the statistics with those of these codes (a client's whole data)."""
        onehot = F.one_hot(labels, self.count.shape[0]).to(mu.dtype)
        second = mu[:, :, None] * mu[:, None, :] + torch.diag_embed(logvar.exp())
        self.count.copy_(onehot.sum(0))
        self.sum.copy_(onehot.T @ mu)
        self.moment.copy_(torch.einsum("nc,nij->cij", onehot, second))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per class: the mean code, a square root of the covariance, and whether the class was
        seen by any client (an unseen class falls back to the standard prior)."""
        seen = self.count > 0
        n = self.count.clamp(min=1.0)
        mean = self.sum / n[:, None]
        cov = self.moment / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
        values, vectors = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
        root = vectors * values.clamp(min=0.0).sqrt()[:, None, :]
        eye = torch.eye(mean.shape[1], device=mean.device).expand_as(root)
        return (torch.where(seen[:, None], mean, torch.zeros_like(mean)),
                torch.where(seen[:, None, None], root, eye), seen)


class CVAE(Generator):
    """Conditional VAE over C x S x S data (S a power of two): images or FE features.

    The encoder sees the data with the label as one-hot planes (the reference fed the raw class
    index as one plane, an ordering the classes do not have); the decoder sees the latent code with
    the one-hot label. Each stage halves (encoder) or doubles (decoder) the spatial size with a 4x4
    stride-2 convolution, so `widths` sets both depth and width. The loss is the reference's:
    summed squared error plus the KL term, per sample.

    `temperature` scales the latent code at sampling only. The decoder returns the mean of its
    data model, so samples at temperature 1 have less spread than real data (measured on
    Fashion-MNIST features: about 60 % of the real per-pixel variance); a larger temperature
    draws more varied ones.

    `prior` is where sampling draws codes from: "standard" is N(0, I), the paper's; "class" is a
    Gaussian per class fitted to the codes the encoder gives the clients' data (the aggregate
    posterior, in the spirit of ex-post density estimation, Ghosh et al. 2020). The standard
    prior has regions no real code falls in, and the code carries some class information the
    label does not override; drawing from each class's own region gives samples that are more
    often of their class at the same spread. The statistics travel with the weights (`stats.`).

    `decoder_variance` is the data model's: "fixed" is the reference's summed squared error (a
    Gaussian of variance 1/2); "calibrated" fits one variance to each batch's error (the sigma-VAE
    of Rybkin et al., 2021). As the error shrinks the reconstruction term then outweighs the KL
    term, so the codes keep more of each sample and the decoded features are sharper (on
    Fashion-MNIST features every latent dimension stays in use, against 11 of 16). Measured with
    the standard prior this was worse: the codes carried the class, so samples drawn from N(0, I)
    often decoded to another class; with the class prior it is better.
    """

    family = "cvae"

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        level: str,
        widths: Sequence[int] = (32, 64, 128),
        latent: int = 16,
        temperature: float = 1.0,
        prior: str = "standard",
        decoder_variance: str = "fixed",
    ) -> None:
        super().__init__(data_shape, num_classes, level)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if prior not in ("standard", "class"):
            raise ValueError(f"prior must be 'standard' or 'class', got {prior!r}")
        if decoder_variance not in ("fixed", "calibrated"):
            raise ValueError(f"decoder_variance must be 'fixed' or 'calibrated', got {decoder_variance!r}")
        self.temperature = temperature
        self.decoder_variance = decoder_variance
        channels, size, _ = data_shape
        if size % (2 ** len(widths)):
            raise ValueError(f"{len(widths)} stride-2 stages do not fit a {size}x{size} input")
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
        dec.append(nn.ConvTranspose2d(rev[-1], channels, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)
        self._top = widths[-1]
        self.stats = ClassLatentStats(num_classes, latent) if prior == "class" else None

    def _decode(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.project(torch.cat([z, onehot], dim=1)))
        return self.to_range(self.decoder(h.view(-1, self._top, self.bottom, self.bottom)))

    def _encode(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = onehot[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        h = self.encoder(torch.cat([x, planes], dim=1))
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(x.dtype)
        mu, logvar = self._encode(x, onehot)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self._decode(z, onehot)
        n = x.shape[0]
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
        if self.decoder_variance == "calibrated":  # Gaussian likelihood, variance = the batch's MSE
            return 0.5 * x[0].numel() * torch.log(F.mse_loss(recon, x) + 1e-8) + kld
        return F.mse_loss(recon, x, reduction="sum") / n + kld

    @torch.no_grad()
    def summarise(self, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> None:
        if self.stats is None:
            return
        self.eval()
        codes = [self._encode(x[i: i + batch_size], F.one_hot(labels[i: i + batch_size], self.num_classes).to(x.dtype))
                 for i in range(0, len(labels), batch_size)]
        self.stats.record(torch.cat([c[0] for c in codes]), torch.cat([c[1] for c in codes]), labels)

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).float()
        eps = torch.randn(labels.shape[0], self.latent, device=labels.device) * self.temperature
        if self.stats is None:
            return self._decode(eps, onehot)
        mean, root, _ = self.stats.scales()
        z = mean[labels] + (root[labels] @ eps[:, :, None]).squeeze(-1)
        return self._decode(z, onehot)


class CVAEF(CVAE):
    family = "cvae-f"


register_generator("cvae", IMAGE, CVAE, presets={
    # The reference's 32x32 CVAE: five stages 64-1024 down to 1x1, about 22.4 M parameters.
    "paper": {"widths": (64, 128, 256, 512, 1024), "latent": 16},
    "small": {"widths": (32, 64, 128), "latent": 16},
})
register_generator("cvae-f", FEATURE, CVAEF, presets={
    # The reference's CVAE-F: four stages 64-512 down to 1x1, about 5.55 M parameters.
    "paper": {"widths": (64, 128, 256, 512), "latent": 16},
    # Three stages at half the width; about 0.37 M parameters, 0.74 MB per direction as float16.
    # (A quarter of the width, 0.10 M, measured 0.5 points lower at head round 20.)
    "small": {"widths": (32, 64, 128), "latent": 16},
    # The lightweight generator: "small", with a decoder whose variance is fitted (sharper
    # features: every latent dimension in use) and codes drawn from each class's own region.
    "light": {"widths": (32, 64, 128), "latent": 16, "prior": "class", "decoder_variance": "calibrated"},
})
