"""The one registry behind tiers, datasets, generator families and algorithms (no training here)."""

import numpy as np
import pytest
from torch import nn

from gefl.algorithms import (
    ALGORITHMS,
    FedAvg,
    GeFLF,
    generator_level,
    list_algorithms,
    make_algorithm,
    register_algorithm,
)
from gefl.config import config_from_dict, config_from_yaml
from gefl.data import DATASETS, dataset_classes, list_datasets, register_dataset
from gefl.errors import GeflError
from gefl.generators import FEATURE, GENERATORS, generator_spec, list_generators, register_generator
from gefl.registry import Registry
from gefl.tiers.models import TIERS, get_model, list_tiers, register_tier


def fresh() -> Registry[int]:
    registry: Registry[int] = Registry("widget")
    registry.register("b", 1)
    registry.register("a", 2)
    registry.seal_builtins()
    return registry


def test_a_miss_lists_the_registered_names():
    registry = fresh()
    registry.register("mine", 3)
    with pytest.raises(GeflError, match=r"unknown widget 'x'; valid widgets are: a, b, mine$"):
        registry.get("x")
    with pytest.raises(GeflError, match="unknown widget"):
        registry.get(["unhashable"])  # type: ignore[arg-type]  (what a YAML list would be)
    assert registry.names() == ["b", "a", "mine"] == list(registry)  # registration order
    assert "a" in registry and "x" not in registry and ["unhashable"] not in registry
    assert len(registry) == 3 and registry.get("mine") == 3


def test_every_registry_misses_with_the_same_wording():
    for call, kind in [(lambda: get_model("cnn9"), "tier"), (lambda: dataset_classes("imagenet"), "dataset"),
                       (lambda: generator_spec("vqvae"), "generator family"),
                       (lambda: ALGORITHMS.get("fedsgd"), "algorithm")]:
        with pytest.raises(GeflError, match=f"unknown {kind} '[a-z0-9]+'; valid ") as err:
            call()
        assert "familys" not in str(err.value)
    assert "valid generator families are: cvae, cvae-f" in str(pytest.raises(GeflError, generator_spec, "x").value)


def test_a_user_name_registered_again_replaces_the_entry_in_place():
    registry = fresh()
    registry.register("mine", 3)
    registry.register("later", 4)
    registry.register("mine", 5)
    assert registry.get("mine") == 5
    assert registry.names() == ["b", "a", "mine", "later"]


def test_a_built_in_name_is_refused():
    registry = fresh()
    with pytest.raises(GeflError, match="widget 'a' is built in; pick another name"):
        registry.register("a", 9)
    assert registry.get("a") == 2 and registry.is_builtin("a") and not registry.is_builtin("x")


def test_before_sealing_a_duplicate_is_a_bug():
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    with pytest.raises(GeflError, match="registered twice"):
        registry.register("a", 2)


def test_gefl_seals_its_own_registries():
    for registry, builtin in [(TIERS, "cnn3"), (DATASETS, "mnist"), (GENERATORS, "cvae-f"), (ALGORITHMS, "fedavg")]:
        assert registry.is_builtin(builtin)
        with pytest.raises(GeflError, match=f"'{builtin}' is built in; pick another name"):
            registry.register(builtin, None)
    with pytest.raises(GeflError, match="tier 'cnn3' is built in"):
        register_tier("cnn3", lambda n: nn.Identity())
    with pytest.raises(GeflError, match="dataset 'mnist' is built in"):
        register_dataset("mnist", ["a"], lambda d: None)
    with pytest.raises(GeflError, match="generator family 'cvae' is built in"):
        register_generator("cvae", "image", generator_spec("cvae").build, {})
    with pytest.raises(GeflError, match="algorithm 'gefl-f' is built in"):
        register_algorithm("gefl-f", FedAvg)


def test_each_public_register_function_replaces_a_user_entry():
    head = lambda n: nn.Linear(768, n)  # noqa: E731
    register_tier("test-registry-tier", lambda n: nn.Identity())
    register_tier("test-registry-tier", lambda n: nn.Sequential(nn.Flatten(), head(n)))
    assert list_tiers().count("test-registry-tier") == 1
    assert get_model("test-registry-tier", num_classes=3).head[1].out_features == 3

    arrays = lambda d: (np.zeros((1, 1, 8, 8), np.uint8),) * 4  # noqa: E731
    register_dataset("test-registry-data", ["a"], arrays)
    register_dataset("test-registry-data", ["a", "b"], arrays)
    assert dataset_classes("test-registry-data") == ["a", "b"] and list_datasets().count("test-registry-data") == 1

    build = generator_spec("cvae-f").build
    register_generator("test-registry-gen", FEATURE, build, {})
    register_generator("test-registry-gen", FEATURE, build, {"tiny": {}})
    assert generator_spec("test-registry-gen").presets == {"tiny": {}}
    assert list_generators(FEATURE).count("test-registry-gen") == 1


class MyAvg(FedAvg):
    """A user's algorithm: FedAvg under another name."""

    name = "test-my-avg"


class MyFeatureGen(GeFLF):
    name = "test-my-gefl-f"


def test_a_user_algorithm_is_accepted_by_config_validation_and_make_algorithm():
    with pytest.raises(GeflError, match="unknown algorithm 'test-my-avg'; valid algorithms are: avgkd, fedavg"):
        config_from_dict({"algorithm": "test-my-avg"})
    register_algorithm("test-my-avg", MyAvg)
    cfg = config_from_dict({"algorithm": "test-my-avg", "tiers": ["cnn2"], "num_clients": 1})
    algorithm = make_algorithm(cfg)
    assert type(algorithm) is MyAvg and algorithm.cfg is cfg
    assert config_from_yaml("algorithm: test-my-avg\n", "the test").algorithm == "test-my-avg"
    assert "test-my-avg" in list_algorithms() and "test-my-avg" in ALGORITHMS and generator_level("test-my-avg") is None
    register_algorithm("test-my-avg", MyAvg)  # a user's own name: registering again replaces, no error


def test_a_user_generator_algorithm_takes_the_families_of_its_level():
    register_algorithm("test-my-gefl-f", MyFeatureGen)
    assert generator_level("test-my-gefl-f") == FEATURE
    with pytest.raises(GeflError, match="unknown feature-level generator family 'cvae'"):
        config_from_dict({"algorithm": "test-my-gefl-f", "gefl": {"generator": {"family": "cvae"}}})
    assert config_from_dict({"algorithm": "test-my-gefl-f"}).gefl.generator.family == "cvae-f"


def test_an_algorithm_factory_must_be_callable():
    with pytest.raises(GeflError, match="must be callable"):
        register_algorithm("test-not-callable", "fedavg")  # type: ignore[arg-type]
