"""What may reach the global state: a client's result is checked before it is averaged."""

import pytest
import torch

from gefl.algorithms import GENERATOR, TRAIN, ClientResult, make_algorithm
from gefl.config import config_from_dict
from gefl.errors import GeflError
from gefl.protocol.wire import decode_state, encode_state


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
    with pytest.raises(GeflError, match=r"0 accepted update\(s\) of 2, the quorum is 1: 2 refused.*lower train.lr"):
        simulate(cfg, out=tmp_path / "run")


@pytest.fixture(scope="module")
def generator_rounds(fmnist):
    """Two real GeFL-F generator rounds of one client on 120 Fashion-MNIST images (the `light`
    CVAE-F: a class prior of 8 components): the first E-step puts every code on component 0, the
    second splits them over the components by responsibility. Returns the algorithm, the global
    state the second round's result is checked against, and both rounds' results."""
    from gefl.algorithms import ClientTask, GlobalState
    from gefl.data import Split

    algo = make_algorithm(config_from_dict({"algorithm": "gefl-f", "tiers": ["cnn3"], "num_clients": 1,
                                            "gefl": {"generator": {"preset": "light", "local_epochs": 1}}}))
    state = algo.prepare_round(GENERATOR, algo.init_state(["cnn3"], 1, 10), 10)
    data = Split(fmnist.train.images[:120], fmnist.train.labels[:120])
    results = []
    for round in (1, 2):
        task = ClientTask(round, GENERATOR, 0, "cnn3", round, encode_state(state.models["cnn3"]),
                          algo.encode_generator(state.generator))
        results.append(algo.client_step(task, data, 10))
        algo.check_result(results[-1], state)
        if round == 1:
            state = algo.aggregate(GENERATOR, state, results)
    return algo, GlobalState(state.models, state.generator), results


def _tampered(algo, result, change):
    stats = algo.decode_generator(result.state)
    stats = {k: v.clone() for k, v in stats.items()}
    change(stats["stats.count"], stats["stats.sum"], stats["stats.moment"])
    return ClientResult(result.client_id, result.tier, result.phase, algo.encode_generator(stats),
                        result.num_samples, result.loss)


def _move_mean(count, total, moment, c, k, mean, cov):
    """Component (c, k)'s sums replaced by those of `count[c, k]` codes of this mean and covariance."""
    n = count[c, k]
    total[c, k] = n * mean
    moment[c, k] = n * (cov + mean[:, None] * mean[None, :])


def test_honest_class_prior_statistics_are_accepted(generator_rounds):
    algo, state, (first, second) = generator_rounds
    count = algo.decode_generator(second.state)["stats.count"]
    assert count.sum().item() == pytest.approx(120, abs=1e-3)
    assert ((count > 0).sum(1) > 1).all()  # the second E-step spread the codes over the components
    algo.check_result(second, state)


def _busiest(algo, result):
    """The class and component holding the most codes, and those codes' mean and covariance."""
    stats = algo.decode_generator(result.state)
    count = stats["stats.count"]
    c, k = divmod(int(count.argmax()), count.shape[1])
    mean = stats["stats.sum"][c, k] / count[c, k]
    cov = stats["stats.moment"][c, k] / count[c, k] - mean[:, None] * mean[None, :]
    return c, k, mean, cov


FORGERIES = {
    "nan-sum": r"NaN or infinite values \(stats.sum\)",
    "inf-moment": r"NaN or infinite values \(stats.moment\)",
    "far-mean": r"of class {c}, component {k}: a mean code of 1e\+03 \(codes lie within \+-100\)",
    "mean-just-out": r"of class {c}, component {k}: a mean code of -1[45]\d ",
    "huge-spread": r"of class {c}, component {k}: second moments of 1e\+05 per sample \(at most 32026 ",
    "negative-definite": r"of class {c}, component {k}: a covariance .* eigenvalue -0\.5, which no codes can have",
    "one-negative-direction": r"of class {c}, component {k}: a covariance .* with eigenvalue -0\.[12]",
    "asymmetric": r"of class {c}, component {k}: a second-moment matrix that is not symmetric",
    "sum-without-count": r"of class {c}, component {k}: a count of 0 but non-zero sums",
    "moment-without-count": r"of class {c}, component {k}: a count of 0 but non-zero sums",
}
"""Each forgery of one component's statistics, and what its refusal says."""


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_class_prior_sums_inconsistent_with_their_counts_are_refused(generator_rounds, forgery):
    """Only the counts were checked: a client could move a class's mixture anywhere (or give it an
    indefinite covariance) with sums and moments of its own making, and every client would then
    sample that class from there."""
    algo, state, (first, honest) = generator_rounds
    if forgery.endswith("without-count"):  # the first E-step puts every code on component 0, none elsewhere
        honest = first
        assert (algo.decode_generator(first.state)["stats.count"][:, 1:] == 0).all()
    c, k, mean, cov = _busiest(algo, honest)
    eye = torch.eye(len(mean))

    def forge(count, total, moment):
        nonlocal c, k
        if forgery == "nan-sum":
            total[c, k, 0] = float("nan")
        elif forgery == "inf-moment":
            moment[c, k, 0, 0] = float("inf")
        elif forgery == "far-mean":  # a consistent Gaussian, far from every code
            _move_mean(count, total, moment, c, k, torch.full_like(mean, 1e3), cov)
        elif forgery == "mean-just-out":
            _move_mean(count, total, moment, c, k, mean - 150.0 * eye[3], cov)
        elif forgery == "huge-spread":
            _move_mean(count, total, moment, c, k, mean, cov + 1e5 * eye)
        elif forgery == "negative-definite":
            _move_mean(count, total, moment, c, k, mean, -0.5 * eye)
        elif forgery == "one-negative-direction":  # the real covariance, but -0.2 along one axis
            values, vectors = torch.linalg.eigh(cov)
            values[0] = -0.2
            _move_mean(count, total, moment, c, k, mean, (vectors * values) @ vectors.T)
        elif forgery == "asymmetric":
            moment[c, k, 0, 1] += count[c, k] * 1.0
        else:
            c, k = 2, 5
            (total if forgery == "sum-without-count" else moment)[c, k, ..., 0] = 0.5

    forged = _tampered(algo, honest, forge)
    with pytest.raises(GeflError, match=rf"client 0: .*{FORGERIES[forgery].format(c=c, k=k)}"):
        algo.check_result(forged, state)


def test_honest_statistics_pass_despite_float32_rounding():
    """60,000 codes 6 from the origin with the smallest variance the encoder gives (exp(-10)): the
    covariance is a small difference of large float32 sums, and its rounding (about 2e-5 of the
    second moments, negative eigenvalues included) must not get an honest client refused."""
    from gefl.generators.cvae import ClassLatentStats, statistics_problem

    stats = ClassLatentStats(1, 16, 1)
    codes = 6.0 + 0.01 * torch.randn(60_000, 16)
    stats.record(codes, torch.full_like(codes, -10.0), torch.zeros(60_000, dtype=torch.long))
    assert statistics_problem(stats.count, stats.sum, stats.moment) is None
    tiny = stats.count * 1e-40  # a far-away component's share, below TINY_COUNT: held to the bounds only
    assert statistics_problem(tiny, stats.sum * 1e-40, stats.moment * 1e-40) is None


def test_a_head_round_result_with_a_changed_feature_extractor_is_refused(fmnist):
    """GeFL-F's FE is frozen after the warm-up, but head rounds average whole models per tier: a
    client's own FE would have been averaged into its tier, under the features the generator models."""
    from gefl.algorithms import HEAD, ClientTask
    from gefl.data import Split

    algo = make_algorithm(config_from_dict({"algorithm": "gefl-f", "tiers": ["cnn3"], "num_clients": 1,
                                            "train": {"local_epochs": 1}}))
    state = algo.init_state(["cnn3"], 1, 10)
    task = ClientTask(3, HEAD, 0, "cnn3", 3, encode_state(state.models["cnn3"]))
    honest = algo.client_step(task, Split(fmnist.train.images[:64], fmnist.train.labels[:64]), 10)
    algo.check_result(honest, state)  # the head trained, the FE as it came
    forged = decode_state(honest.state)
    forged[next(k for k in forged if k.startswith("fe.") and forged[k].is_floating_point())] += 0.1
    with pytest.raises(GeflError, match=r"client 0: the tier 'cnn3' model's feature extractor differs from the global "
                                        r"one \(fe\..*\); it is frozen after the warm-up"):
        algo.check_result(result(forged, tier="cnn3", phase=HEAD), state)
