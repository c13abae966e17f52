"""gefl: the shared core of gefl-edge (models, generators, data, training, aggregation,
the federation state machine and the in-process simulation). No networking lives here.

The public names are imported on first use (PEP 562), so `import gefl` costs nothing: the
`gefl infer` command and a board with only the `infer` extra must never pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "list_algorithms": "gefl.algorithms", "make_algorithm": "gefl.algorithms", "register_algorithm": "gefl.algorithms",
    "Config": "gefl.config", "load_config": "gefl.config",
    "list_datasets": "gefl.data", "load_dataset": "gefl.data", "register_dataset": "gefl.data",
    "GeflError": "gefl.errors",
    "build_generator": "gefl.generators", "list_generators": "gefl.generators",
    "register_generator": "gefl.generators",
    "get_model": "gefl.models", "list_tiers": "gefl.models", "register_tier": "gefl.models",
    "simulate": "gefl.simulation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gefl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
