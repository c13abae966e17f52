"""What may reach the global state: a client's result is checked before it is averaged."""

import pytest
import torch

from gefl.algorithms import GENERATOR, TRAIN, ClientResult, make_algorithm
from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.wire import encode_state


@pytest.fixture()
def setup():
    algo = make_algorithm(config_from_dict({"algorithm": "fedavg", "tiers": ["cnn2", "cnn3"], "num_clients": 2}))
    state = algo.init_state(["cnn2", "cnn3"], 1, 10)
    return algo, state


def result(state_dict, tier="cnn2", phase=TRAIN) -> ClientResult:
    return ClientResult(0, tier, phase, encode_state(state_dict), 600, 0.1)


def test_a_finite_result_of_the_right_shapes_is_accepted(setup):
    algo, state = setup
    algo.check_result(result(state.models["cnn2"]), state)


def test_nan_or_inf_weights_are_refused_and_named(setup):
    algo, state = setup
    bad = {k: v.clone() for k, v in state.models["cnn2"].items()}
    bad["head.fc.weight"][0, 0] = float("nan")
    with pytest.raises(GeflError, match="NaN or infinite values.*head.fc.weight.*diverged"):
        algo.check_result(result(bad), state)
    bad["head.fc.weight"][0, 0] = float("inf")
    with pytest.raises(GeflError, match="NaN or infinite"):
        algo.check_result(result(bad), state)


def test_wrong_shapes_keys_and_missing_generator_are_refused(setup):
    algo, state = setup
    reshaped = {**state.models["cnn2"], "head.fc.weight": torch.zeros(10, 512)}
    shape_error = r"'head.fc.weight' is torch.float32\[10, 512\], expected torch.float32\[10, 1024\]"
    with pytest.raises(GeflError, match=shape_error):
        algo.check_result(result(reshaped), state)
    with pytest.raises(GeflError, match="entries differ"):
        algo.check_result(result(state.models["cnn3"], tier="cnn2"), state)
    partial = dict(state.models["cnn2"])
    partial.pop("head.fc.bias")
    with pytest.raises(GeflError, match="entries differ"):
        algo.check_result(result(partial), state)
    with pytest.raises(GeflError, match="no global generator"):
        algo.check_result(result({"w": torch.zeros(1)}, phase=GENERATOR), state)


def test_generator_statistics_with_forged_counts_are_refused():
    """A class prior's counts are summed into every client's sampling: negative ones, or more
    than the client's own samples, would let one client outweigh the others."""
    from gefl.algorithms import GlobalState
    from gefl.generators import build_generator

    algo = make_algorithm(config_from_dict({"algorithm": "gefl-f", "gefl": {"generator": {"preset": "light"}}}))
    gen = build_generator("cvae-f", (3, 16, 16), 10, "light")
    x, y = torch.rand(60, 3, 16, 16), torch.arange(60) % 10
    gen.summarise(x, y)
    state = GlobalState({}, gen.state_dict())
    honest = ClientResult(0, "cnn3", GENERATOR, algo.encode_generator(gen.state_dict()), 60, 0.1)
    algo.check_result(honest, state)
    for forged, match in ((-1.0, r"smallest entry -1\.0"), (1e6, r"hold \d+\.\d samples .* for 60 trained on")):
        bad = {k: v.clone() for k, v in gen.state_dict().items()}
        bad["stats.count"][3, 0] = forged
        with pytest.raises(GeflError, match=match):
            algo.check_result(ClientResult(0, "cnn3", GENERATOR, algo.encode_generator(bad), 60, 0.1), state)


def test_a_diverging_federation_stops_with_advice(tmp_path):
    from gefl import simulate

    cfg = {"algorithm": "fedavg", "num_clients": 2, "tiers": ["cnn2"], "rounds": 2, "workers": 1,
           "partition": {"samples_per_client": 200}, "train": {"lr": 1.0e12, "local_epochs": 1}}
    with pytest.raises(GeflError, match=r"every client's update was refused.*lower train.lr"):
        simulate(cfg, out=tmp_path / "run", progress=None)
