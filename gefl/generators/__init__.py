"""Conditional generators, behind a registry: of images (GeFL) and of FE features (GeFL-F).

A generator is an `nn.Module` that knows how to train itself on one batch of real data and labels
(`train_step`) and how to draw labelled samples (`sample`). The training loop and the federation
never look inside, so a new family only has to implement those two methods and register a factory.

Every family produces samples on the value range of the real data it models, because the
classifier trains on both: images in [-1, 1] (the dataset's normalisation), FE features in
[0, inf) (the FE ends in ReLU). The reference code fed [0, 1] samples to a [-1, 1] classifier.

The interface and the registry live in gefl.generators.base, which the families import; this
package imports the families (so they register) and re-exports the base, then seals the built-in
families (see gefl.registry).
"""

from __future__ import annotations

from gefl.generators import cvae, dcgan, ddpm  # noqa: F401  (each registers its families)
from gefl.generators.base import (
    FEATURE,
    GENERATORS,
    IMAGE,
    STATS_PREFIX,
    Generator,
    GeneratorSpec,
    build_generator,
    check_generator_state,
    generator_options,
    generator_spec,
    list_generators,
    register_generator,
)

__all__ = [
    "FEATURE", "GENERATORS", "IMAGE", "STATS_PREFIX", "Generator", "GeneratorSpec", "build_generator",
    "check_generator_state", "generator_options", "generator_spec", "list_generators", "register_generator",
]

GENERATORS.seal_builtins()
