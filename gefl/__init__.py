"""gefl: the core of gefl-edge. Its folders are its parts: tiers, generators, algorithms, rounds
(the one round loop), simulation, data, and protocol (what both network ends share: messages, the
wire format, the MQTT connection); cli.py is the command line. The network ends themselves, the
aggregator's servers and the board's client, install beside it as gefl.aggregator and
gefl.edge_client and use the core, never the reverse.

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
    "get_model": "gefl.tiers.models", "list_tiers": "gefl.tiers.models", "register_tier": "gefl.tiers.models",
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
