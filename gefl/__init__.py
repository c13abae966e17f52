"""gefl: the shared core of gefl-edge (models, generators, data, training, aggregation,
the federation state machine and the in-process simulation). No networking lives here."""

from gefl.config import Config, load_config
from gefl.data import list_datasets, load_dataset, register_dataset
from gefl.errors import GeflError
from gefl.generators import build_generator, list_generators, register_generator
from gefl.models import get_model, list_tiers, register_tier
from gefl.simulation import simulate

__all__ = [
    "Config", "GeflError", "build_generator", "get_model", "list_datasets", "list_generators", "list_tiers",
    "load_config", "load_dataset", "register_dataset", "register_generator", "register_tier", "simulate",
]
__version__ = "0.1.0"
