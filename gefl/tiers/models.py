"""The tier zoo: every classifier is the common feature extractor (FE) plus a tier-specific head.

The FE is what makes the tiers able to share anything at all: in GeFL-F it is averaged over
every client and then frozen, and the generator learns the distribution of its output. So the
FE is built here, once, and a tier only ever supplies its head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gefl.registry import Registry

FE_CHANNELS = 3
"""Channels of the FE's output; with 32x32 input the features are 3x16x16."""


class FeatureExtractor(nn.Module):
    """The paper's first block: 3x3 conv to 3 channels, BN, ReLU, 2x2 max-pool (32x32 -> 16x16)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, FE_CHANNELS, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(FE_CHANNELS)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class ConvHead(nn.Module):
    """conv3x3 + BN + ReLU + max-pool per width, then one linear layer to the classes."""

    def __init__(self, widths: Sequence[int], num_classes: int = 10, feature_size: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = FE_CHANNELS, feature_size
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * size * size, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(features), 1))


class TierNet(nn.Module):
    """A tier's whole network. `forward` takes images; `head` alone takes FE features."""

    def __init__(self, fe: FeatureExtractor, head: nn.Module, tier: str) -> None:
        super().__init__()
        self.fe = fe
        self.head = head
        self.tier = tier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fe(x))


HeadFactory = Callable[[int], nn.Module]
"""Builds a head for `num_classes` classes; it must accept FE features of shape (N, 3, 16, 16)."""


@dataclass(frozen=True)
class TierSpec:
    name: str
    make_head: HeadFactory
    description: str = ""


TIERS: Registry[TierSpec] = Registry("tier")


def register_tier(name: str, make_head: HeadFactory, description: str = "") -> None:
    """Add a tier. Its network will be the common FE followed by `make_head(num_classes)`.

    The head sees FE features (N, 3, 16, 16), never images, which is what lets it learn from
    generated features in GeFL-F. Registering a name of your own again replaces that tier; a
    built-in tier's name is refused (see gefl.registry).
    """
    TIERS.register(name, TierSpec(name, make_head, description))


def list_tiers() -> list[str]:
    """Registered tier names, the paper's ten first in the paper's order."""
    return TIERS.names()


def tier_spec(name: str) -> TierSpec:
    return TIERS.get(name)


def get_model(name: str, in_channels: int = 1, num_classes: int = 10) -> TierNet:
    """A fresh, randomly initialised network of tier `name`."""
    spec = TIERS.get(name)
    return TierNet(FeatureExtractor(in_channels), spec.make_head(num_classes), name)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


PAPER_TIERS: dict[str, tuple[int, ...]] = {
    "cnn2": (16,),
    "cnn3": (16, 32),
    "cnn3b": (20, 40),
    "cnn3c": (10, 20),
    "cnn4": (16, 32, 64),
    "cnn4b": (20, 40, 80),
    "cnn4c": (10, 20, 40),
    "cnn5": (16, 32, 64, 128),
    "cnn5b": (20, 40, 80, 100),
    "cnn5c": (32, 32, 64, 128),
}
"""The paper's ten architectures, client i uses the i-th; widths of the head's conv layers."""


def _paper_head(widths: tuple[int, ...]) -> HeadFactory:
    return lambda num_classes: ConvHead(widths, num_classes)


for _name, _widths in PAPER_TIERS.items():
    register_tier(_name, _paper_head(_widths), f"paper CNN, head widths {'-'.join(map(str, _widths))}")


def _mobilenet_v3_small_head(num_classes: int) -> nn.Module:
    """torchvision's MobileNetV3-Small with a stride-1 stem.

    Its five stride-2 stages would take an ImageNet-sized input to 1/32; the FE's 16x16 features
    would be 1x1 after the third. With the stem at stride 1 the 16x16 features reach exactly 1x1
    only at the last stage, so every bottleneck still sees some spatial extent.
    """
    from torchvision.models import mobilenet_v3_small  # lazy: a second or more, and most processes never need it

    net = mobilenet_v3_small(weights=None, num_classes=num_classes)
    net.features[0][0].stride = (1, 1)
    return net


def _resnet18_head(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR adaptation: 3x3 stride-1 conv1 and no max-pool.

    The ImageNet stem (7x7 stride 2, then max-pool) would shrink 16x16 features to 4x4 before the
    first residual stage; without it the stages run at 16, 8, 4 and 2.
    """
    from torchvision.models import resnet18  # lazy, as above

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(FE_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


OPT_IN_TIERS: tuple[str, ...] = ("mobilenet-v3-small", "resnet18")
"""Larger tiers for Jetsons and desktop GPUs: registered, but in no default tier list; a federation
names them in `tiers` to use them."""

register_tier("mobilenet-v3-small", _mobilenet_v3_small_head, "torchvision MobileNetV3-Small, stride-1 stem (opt-in)")
register_tier("resnet18", _resnet18_head, "torchvision ResNet-18, 3x3 stride-1 conv1, no max-pool (opt-in)")
TIERS.seal_builtins()
