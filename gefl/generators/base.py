"""The generator interface and the registry of families; see gefl.generators.

The families (cvae, dcgan, ddpm) import what they implement and register with from here, and
gefl.generators imports them: nothing in this module imports a family back.
"""


from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gefl.errors import GeflError, unknown_name
from gefl.optim import Adam
from gefl.registry import Registry

IMAGE, FEATURE = "image", "feature"
STATS_PREFIX = "stats."
"""Generator entries that are sufficient statistics (see `Generator.summarise`), not weights."""


class Generator(nn.Module):
    """Interface of every generator family."""

    family: str = ""

    def __init__(self, data_shape: Sequence[int], num_classes: int, level: str) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.level = level

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective on a batch, for families with a single one."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, labels: torch.Tensor, optimizer: Adam) -> float:
        """One optimisation step on a batch of real data; returns the loss. Adversarial families
        override this (two objectives, one optimizer over both networks)."""
        loss = self.loss(x, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """Samples for the given labels, on the real data's value range."""
        raise NotImplementedError

    def summarise(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """After a client's local training: record in buffers under `stats.` what sampling needs
        to know about the client's data (most families need nothing). Those buffers must be sums
        over the client's samples: the aggregator adds them up over the clients (it averages the
        weights), and they travel in float32 whatever the wire dtype."""

    def to_range(self, x: torch.Tensor) -> torch.Tensor:
        """Map a raw network output onto the real data's range: tanh for images, ReLU for features."""
        return torch.tanh(x) if self.level == IMAGE else torch.relu(x)

    def clamp_range(self, x: torch.Tensor) -> torch.Tensor:
        """Clip a sample (a diffusion model's, which has no output activation) onto the data's range."""
        return x.clamp(-1.0, 1.0) if self.level == IMAGE else x.clamp(min=0.0)


@dataclass(frozen=True)
class GeneratorSpec:
    family: str
    level: str
    """IMAGE (GeFL: models the images) or FEATURE (GeFL-F: models the frozen FE's output)."""
    build: Callable[..., Generator]
    presets: dict[str, dict]

    def options(self) -> list[str]:
        """Names a config's `gefl.generator.options` may set for this family."""
        params = inspect.signature(self.build).parameters
        return [n for n in params if n not in ("data_shape", "num_classes", "level")]


GENERATORS: Registry[GeneratorSpec] = Registry("generator family", "generator families")
"""Sealed by gefl.generators once the built-in families (cvae, dcgan, ddpm) have registered."""


def register_generator(family: str, level: str, build: Callable[..., Generator], presets: dict[str, dict]) -> None:
    """Add a family; `build(data_shape=, num_classes=, level=, **preset_and_options)`. Registering
    a family of your own again replaces it; a built-in family's name is refused (see gefl.registry)."""
    if level not in (IMAGE, FEATURE):
        raise GeflError(f"generator level must be {IMAGE!r} or {FEATURE!r}, got {level!r}")
    GENERATORS.register(family, GeneratorSpec(family, level, build, presets))


def list_generators(level: str | None = None) -> list[str]:
    return [f for f, s in GENERATORS.items() if level is None or s.level == level]


def generator_spec(family: str) -> GeneratorSpec:
    return GENERATORS.get(family)


def generator_options(family: str, preset: str | None, options: dict | None = None) -> dict:
    """The constructor options a (family, preset, overrides) triple resolves to; checked by name."""
    spec = generator_spec(family)
    resolved: dict = {}
    if preset is not None and not isinstance(preset, str):
        raise GeflError(f"generator {family!r}: a preset is named by a string, got {preset!r:.80}")
    if options is not None and not isinstance(options, dict):
        raise GeflError(f"generator {family!r}: options must map option names to values, got {options!r:.80}")
    if preset is not None:
        if preset not in spec.presets:
            raise unknown_name(f"{family} preset", preset, spec.presets)
        resolved.update(spec.presets[preset])
    for key, value in (options or {}).items():
        if key not in spec.options():
            raise GeflError(f"generator {family!r} has no option {key!r}; its options are: "
                            f"{', '.join(spec.options())}")
        resolved[key] = tuple(value) if isinstance(value, list) else value
    return resolved


def build_generator(
    family: str,
    data_shape: Sequence[int],
    num_classes: int,
    preset: str | None = None,
    options: dict | None = None,
) -> Generator:
    """A fresh generator; `options` override the preset's values."""
    spec = generator_spec(family)
    kwargs = generator_options(family, preset, options)
    try:
        return spec.build(data_shape=tuple(data_shape), num_classes=num_classes, level=spec.level, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: torch refusing e.g. a negative width
        raise GeflError(f"generator {family!r} with {kwargs}: {exc}") from exc


def check_generator_state(generator: Generator, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that do not fit `generator`, naming the first entries that differ.

    `load_state_dict` would also refuse them, but with a wall of text; a user who pointed at the
    wrong file needs to read which family, which entry and which shape.
    """
    expected = generator.state_dict()
    what = f"the {generator.family} generator"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}")
        raise GeflError(f"{source}: entries do not match {what} ({'; '.join(parts)})")
    for key, value in state.items():
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape):
            raise GeflError(f"{source}: entry {key!r} has shape {list(value.shape)}, "
                            f"{what} expects {list(want.shape)}")
        if value.is_floating_point() != want.is_floating_point():
            raise GeflError(f"{source}: entry {key!r} is {value.dtype}, {what} expects {want.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise GeflError(f"{source}: entry {key!r} has NaN or infinite values")

