"""The generator families, their registry and errors, their checkpoints, and their config keys.

Real tensors throughout: every family trains one step and samples; the paper presets are counted;
checkpoints are written to and read back from real files.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from gefl.algorithms import GENERATOR, HEAD, ClientResult, GlobalState, make_algorithm
from gefl.config import GeneratorConfig, config_from_dict
from gefl.data import Dataset, Split
from gefl.errors import GeflError
from gefl.generators import (
    FEATURE,
    IMAGE,
    build_generator,
    check_generator_state,
    generator_spec,
    list_generators,
)
from gefl.protocol.wire import decode_state
from gefl.rounds.checkpoint import restore_global_state, state_arrays
from gefl.rounds.rundir import RunDir, load_generator
from gefl.tiers.models import count_parameters

FEATURE_SHAPE = (3, 16, 16)
IMAGE_SHAPE = (1, 32, 32)
CLASSES = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep the CPU use of these tests to one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shape(family: str) -> tuple[int, int, int]:
    return FEATURE_SHAPE if family.endswith("-f") else IMAGE_SHAPE


def _fast(family: str) -> dict | None:
    return {"steps": 5} if family.startswith("ddpm") else None


def _real_batch(family: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random data on the range the family models: FE features >= 0, images in [-1, 1]."""
    x = torch.randn(n, *_shape(family))
    x = x.relu() if family.endswith("-f") else x.clamp(-1.0, 1.0)
    return x, torch.randint(CLASSES, (n,))


# --------------------------------------------------------------------------- every family


def test_registry_holds_image_and_feature_families():
    families = list_generators()
    assert {"cvae", "cvae-f", "dcgan", "dcgan-f", "ddpm", "ddpm-f"} <= set(families)
    assert set(list_generators(FEATURE)) == {f for f in families if f.endswith("-f")}
    assert set(list_generators(IMAGE)) == {f for f in families if not f.endswith("-f")}


@pytest.mark.parametrize("family", list_generators())
def test_small_preset_trains_one_step_and_samples_on_the_data_range(family):
    torch.manual_seed(0)
    gen = build_generator(family, _shape(family), CLASSES, "small", _fast(family))
    assert gen.family == family
    x, labels = _real_batch(family)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    loss = gen.train_step(x, labels, opt)
    assert isinstance(loss, float)
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(p).all() for p in gen.parameters())

    gen.eval()
    labels = torch.arange(CLASSES).repeat(2)
    with torch.no_grad():
        out = gen.sample(labels)
    assert out.shape == (20, *_shape(family))
    assert torch.isfinite(out).all()
    if family.endswith("-f"):
        assert out.shape == (20, 3, 16, 16)
        assert (out >= 0).all(), "real FE features are post-ReLU, generated ones must be too"
    else:
        assert out.shape == (20, 1, 32, 32)
        assert out.min() >= -1.0 and out.max() <= 1.0, "images are normalised to [-1, 1]"
    assert out.std() > 0, "samples must not all be the same value"


def test_ddpm_steps_option_overrides_the_preset():
    gen = build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small", {"steps": 5})
    assert gen.steps == 5 and len(gen.betas) == 6
    assert build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small").steps == 100


def _textbook_ddpm_sample(gen, labels: torch.Tensor) -> torch.Tensor:
    """Ho et al.'s sampler written out step by step: every trained step, sigma^2 = beta."""
    context = torch.nn.functional.one_hot(labels, CLASSES).float()
    x = torch.randn(len(labels), *gen.data_shape)
    for step in range(gen.steps, 0, -1):
        eps = gen.net(x, context, torch.full((len(labels),), step / gen.steps))
        beta, bar = gen.betas[step], gen.alpha_bar[step]
        x = (x - eps * beta / (1 - bar).sqrt()) / (1 - beta).sqrt()
        if step > 1:
            x = x + beta.sqrt() * torch.randn_like(x)
    return gen.clamp_range(x)


@torch.no_grad()
def test_ddpm_visits_every_trained_step_unless_told_otherwise():
    gen = build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small", {"steps": 7, "width": 8}).eval()
    labels = torch.arange(6) % CLASSES
    torch.manual_seed(3)
    ours = gen.sample(labels)
    torch.manual_seed(3)
    assert torch.equal(ours, _textbook_ddpm_sample(gen, labels))


@torch.no_grad()
def test_ddpm_sample_steps_run_that_many_passes_and_reach_the_same_noise_level():
    """A respaced chain must cost `sample_steps` network passes, start at the top trained step and,
    step by step, remove exactly the noise of the whole trained schedule: its betas' alphas multiply
    to alpha_bar[steps] / alpha_bar[0], as the trained ones do."""
    gen = build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small", {"steps": 50, "width": 8,
                                                                       "sample_steps": 8}).eval()
    passes = []
    gen.net.register_forward_hook(lambda _m, args, _out: passes.append(args[2][0].item()))
    out = gen.sample(torch.arange(4))
    assert len(passes) == 8 and passes[0] == 1.0 and passes[-1] == pytest.approx(1 / 50)
    assert passes == sorted(passes, reverse=True)
    kept = torch.prod(1 - gen.chain_betas.double())
    assert kept.item() == pytest.approx((gen.alpha_bar[50] / gen.alpha_bar[0]).item(), rel=1e-5)
    assert torch.prod(1 - gen.betas[1:].double()).item() == pytest.approx(kept.item(), rel=1e-5)
    assert out.shape == (4, *FEATURE_SHAPE) and torch.isfinite(out).all()


@pytest.mark.parametrize("sample_steps", [0, 6])
def test_ddpm_sample_steps_outside_one_to_steps_is_a_gefl_error(sample_steps):
    with pytest.raises(GeflError, match="sample_steps"):
        build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small", {"steps": 5, "sample_steps": sample_steps})


# --------------------------------------------------------------------------- paper sizes


@pytest.mark.parametrize("family, low, high", [
    ("cvae-f", 5.4e6, 5.7e6),
    ("ddpm-f", 4.3e6, 4.5e6),
    ("cvae", 22.3e6, 22.45e6),
    ("ddpm", 7.5e6, 7.65e6),
])
def test_paper_preset_is_the_papers_size(family, low, high):
    n = count_parameters(build_generator(family, _shape(family), CLASSES, "paper"))
    assert low < n < high, f"{family} paper preset has {n} parameters"


@pytest.mark.parametrize("family, g_size, d_size", [
    ("dcgan-f", 2.56e6, 2.64e6),
    ("dcgan", 3.08e6, 2.64e6),
])
def test_paper_dcgan_generator_and_discriminator_sizes(family, g_size, d_size):
    gen = build_generator(family, _shape(family), CLASSES, "paper")
    n_g = sum(p.numel() for p in gen.generator_parameters())
    n_d = sum(p.numel() for p in gen.discriminator_parameters())
    assert abs(n_g - g_size) < 0.02e6, f"{family} G has {n_g} parameters"
    assert abs(n_d - d_size) < 0.02e6, f"{family} D has {n_d} parameters"
    # Every parameter belongs to exactly one of the two networks.
    assert n_g + n_d == count_parameters(gen)


# --------------------------------------------------------------------------- learning


def test_cvae_f_learns_class_conditional_features():
    """Two classes with different constant feature maps: after training, samples of each class
    must be closer to their own class's map than to the other's."""
    torch.manual_seed(0)
    gen = build_generator("cvae-f", FEATURE_SHAPE, 2, "small", {"latent": 4})
    assert gen.latent == 4
    feats = torch.cat([torch.full((64, *FEATURE_SHAPE), 0.2), torch.full((64, *FEATURE_SHAPE), 1.5)])
    feats = feats + 0.05 * torch.rand_like(feats)
    labels = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    losses = [gen.train_step(feats, labels, opt) for _ in range(150)]
    assert losses[-1] < 0.2 * losses[0]
    gen.eval()
    with torch.no_grad():
        s0 = gen.sample(torch.zeros(32, dtype=torch.long)).mean().item()
        s1 = gen.sample(torch.ones(32, dtype=torch.long)).mean().item()
    assert abs(s0 - 0.22) < abs(s0 - 1.52) and abs(s1 - 1.52) < abs(s1 - 0.22)


# --------------------------------------------------------------------------- DCGAN's two objectives


class _RecordingAdam(torch.optim.Adam):
    """A real Adam that notes, at every step, which parameters carry a gradient and their values after."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.had_grad: list[set[int]] = []
        self.after: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.had_grad.append({id(p) for p in params if p.grad is not None})
        out = super().step(closure)
        self.after.append([p.detach().clone() for p in params])
        return out


def _changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("family", ["dcgan-f", "dcgan"])
def test_dcgan_step_updates_both_networks_each_with_its_own_objective(family):
    torch.manual_seed(0)
    gen = build_generator(family, _shape(family), CLASSES, "small")
    g_params, d_params = gen.generator_parameters(), gen.discriminator_parameters()
    g_ids, d_ids = {id(p) for p in g_params}, {id(p) for p in d_params}
    g0 = [p.detach().clone() for p in g_params]
    d0 = [p.detach().clone() for p in d_params]
    all_params = list(gen.parameters())
    opt = _RecordingAdam(all_params, lr=2e-4, betas=(0.5, 0.999))
    x, labels = _real_batch(family)

    loss = gen.train_step(x, labels, opt)
    assert torch.isfinite(torch.tensor(loss))
    # Every generator and every discriminator tensor moved.
    assert _changed(g0, [p.detach() for p in g_params]), "a generator parameter did not change"
    assert _changed(d0, [p.detach() for p in d_params]), "a discriminator parameter did not change"

    # Two optimizer steps: the first with discriminator gradients only (the generated batch is
    # detached), the second with generator gradients only (the generator's objective never moves D).
    assert len(opt.had_grad) == 2
    assert opt.had_grad[0] == d_ids, "the discriminator step must carry D gradients and only those"
    assert opt.had_grad[1] == g_ids, "the generator step must carry G gradients and only those"
    index = {id(p): i for i, p in enumerate(all_params)}
    after_d, after_g = opt.after
    for p in d_params:  # D is what the first step left it, untouched by the generator step
        assert torch.equal(after_d[index[id(p)]], after_g[index[id(p)]])
        assert torch.equal(after_g[index[id(p)]], p.detach())
    for b, p in zip(g0, g_params, strict=True):  # G did not move in the discriminator step
        assert torch.equal(after_d[index[id(p)]], b)

    # A second step works and everything stays finite.
    g1 = [p.detach().clone() for p in g_params]
    loss2 = gen.train_step(*_real_batch(family), opt)
    assert torch.isfinite(torch.tensor(loss2))
    assert all(torch.isfinite(p).all() for p in gen.parameters())
    assert all(torch.isfinite(b).all() for b in gen.buffers() if b.is_floating_point())
    assert _changed(g1, [p.detach() for p in g_params])


# --------------------------------------------------------------------------- errors


def test_unknown_family_lists_the_valid_families():
    with pytest.raises(GeflError, match="unknown generator family 'gan'") as err:
        build_generator("gan", FEATURE_SHAPE, CLASSES)
    for family in list_generators():
        assert family in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(GeflError, match="unknown cvae-f preset 'huge'.*paper, small"):
        build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "huge")


def test_unknown_option_names_it_and_the_valid_options():
    with pytest.raises(GeflError, match="'depth'") as err:
        build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "small", {"depth": 3})
    assert "widths" in str(err.value) and "latent" in str(err.value)
    assert generator_spec("cvae-f").options() == ["widths", "latent", "temperature", "prior", "decoder_variance",
                                                    "prior_components"]


@pytest.mark.parametrize("family, options", [
    ("cvae-f", {"widths": [8, 8, 8, 8, 8]}),  # 2^5 does not divide 16
    ("cvae", {"widths": [8, 8, 8, 8, 8, 8]}),  # 2^6 does not divide 32
    ("dcgan-f", {"g_widths": [64, 64, 64]}),  # 4 * 2^3 = 32, not 16
])
def test_widths_that_do_not_fit_fail_with_a_gefl_error(family, options):
    with pytest.raises(GeflError, match="do not fit"):
        build_generator(family, _shape(family), CLASSES, "small", options)


def test_ddpm_out_of_range_option_is_a_gefl_error():
    with pytest.raises(GeflError, match="steps >= 1"):
        build_generator("ddpm-f", FEATURE_SHAPE, CLASSES, "small", {"steps": 0})


# --------------------------------------------------------------------------- check_generator_state


def _cvae_f_small() -> torch.nn.Module:
    return build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "small")


def test_state_of_another_family_does_not_match():
    dcgan_state = build_generator("dcgan-f", FEATURE_SHAPE, CLASSES, "small").state_dict()
    with pytest.raises(GeflError, match="entries do not match the cvae-f generator"):
        check_generator_state(_cvae_f_small(), dcgan_state, "dcgan.safetensors")


def test_state_with_a_wrong_shape_names_the_entry_and_both_shapes():
    gen = _cvae_f_small()
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    state["mu.weight"] = torch.zeros(16, 100)
    with pytest.raises(GeflError) as err:
        check_generator_state(gen, state, "bad.safetensors")
    msg = str(err.value)
    expected = list(gen.state_dict()["mu.weight"].shape)
    assert "'mu.weight'" in msg and "[16, 100]" in msg and str(expected) in msg
    assert msg.startswith("bad.safetensors")


def test_state_with_nan_is_refused():
    gen = _cvae_f_small()
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    state["project.bias"][3] = float("nan")
    with pytest.raises(GeflError, match="'project.bias' has NaN"):
        check_generator_state(gen, state, "nan.safetensors")


def test_a_matching_state_passes():
    gen = _cvae_f_small()
    check_generator_state(_cvae_f_small(), gen.state_dict(), "ok.safetensors")


# --------------------------------------------------------------------------- load_generator


def _metadata(family: str = "cvae-f", preset: str | None = "small", options: dict | None = None) -> dict[str, str]:
    """What RunDir.save_weights writes next to a generator's weights."""
    return {
        "dataset": "fashion-mnist", "in_channels": "1", "num_classes": str(CLASSES),
        "classes": json.dumps([f"c{i}" for i in range(CLASSES)]), "algorithm": "gefl-f",
        "family": family, "preset": json.dumps(preset), "options": json.dumps(options or {}),
    }


def _save(gen: torch.nn.Module, path, **meta) -> None:
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, str(path), metadata=_metadata(**meta))


@pytest.fixture
def trained_cvae_f(tmp_path):
    """A cvae-f small with one training step behind it (so its BatchNorm statistics are not the
    initial ones), saved as a run would save it."""
    torch.manual_seed(1)
    gen = _cvae_f_small()
    gen.train_step(*_real_batch("cvae-f"), torch.optim.Adam(gen.parameters(), lr=1e-3))
    gen.eval()
    path = tmp_path / "generator.safetensors"
    _save(gen, path)
    return gen, path


def test_load_generator_round_trip_samples_the_same(trained_cvae_f):
    gen, path = trained_cvae_f
    loaded, meta = load_generator(path)
    assert type(loaded) is type(gen) and loaded.family == "cvae-f"
    assert not loaded.training
    assert meta["family"] == "cvae-f" and json.loads(meta["preset"]) == "small"
    labels = torch.arange(CLASSES).repeat(3)
    with torch.no_grad():
        torch.manual_seed(7)
        want = gen.sample(labels)
        torch.manual_seed(7)
        got = loaded.sample(labels)
        torch.manual_seed(8)
        other = loaded.sample(labels)
    assert torch.equal(got, want)
    assert not torch.equal(other, want), "a different seed must give different samples"
    for k, v in gen.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # With the expected family named, the same file loads as well.
    load_generator(path, family="cvae-f")


def test_load_generator_from_a_run_directory(trained_cvae_f, tmp_path):
    gen, path = trained_cvae_f
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "generator.safetensors").write_bytes(path.read_bytes())
    loaded, _ = load_generator(run)
    for k, v in gen.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_save_weights_then_load_generator(tmp_path):
    """The real writer (RunDir.save_weights) and the real reader agree, options included."""
    torch.manual_seed(2)
    cfg = config_from_dict({"algorithm": "gefl-f", "tiers": ["cnn2"], "gefl": {"generator": {
        "family": "cvae-f", "preset": "small", "options": {"widths": [16, 32, 64], "latent": 8}}}})
    gen = build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "small", cfg.gefl.generator.options)
    images = torch.zeros(4, 1, 32, 32)
    dataset = Dataset("fashion-mnist", Split(images, torch.zeros(4, dtype=torch.long)),
                      Split(images, torch.zeros(4, dtype=torch.long)), [f"c{i}" for i in range(CLASSES)])
    run = RunDir(tmp_path)
    run.save_weights(GlobalState(models={}, generator=gen.state_dict()), dataset, cfg)
    loaded, meta = load_generator(tmp_path, family="cvae-f")
    assert loaded.latent == 8 and loaded.encoder[0].out_channels == 16
    assert json.loads(meta["options"]) == {"widths": [16, 32, 64], "latent": 8}
    gen.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        want = gen.sample(torch.arange(CLASSES))
        torch.manual_seed(3)
        assert torch.equal(loaded.sample(torch.arange(CLASSES)), want)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_load_generator_truncated_file(trained_cvae_f, tmp_path, keep):
    _, path = trained_cvae_f
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GeflError, match="corrupted or truncated"):
        load_generator(cut)


def test_load_generator_metadata_of_another_family(tmp_path):
    path = tmp_path / "liar.safetensors"
    _save(_cvae_f_small(), path, family="dcgan-f")
    with pytest.raises(GeflError, match="entries do not match the dcgan-f generator"):
        load_generator(path)


def test_load_generator_expected_family_differs(trained_cvae_f):
    _, path = trained_cvae_f
    with pytest.raises(GeflError) as err:
        load_generator(path, family="ddpm-f")
    assert "'cvae-f'" in str(err.value) and "'ddpm-f'" in str(err.value)


def test_load_generator_options_that_do_not_fit_the_weights(tmp_path):
    path = tmp_path / "narrow.safetensors"
    wide = _cvae_f_small()
    _save(wide, path, options={"widths": [16, 32, 64]})
    with pytest.raises(GeflError) as err:
        load_generator(path)
    msg = str(err.value)
    found = re.search(r"entry '([\w.]+)' has shape (\[[\d, ]*\]), the cvae-f generator expects (\[[\d, ]*\])", msg)
    assert found, msg
    entry, got, want = found.groups()
    narrow = build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "small", {"widths": [16, 32, 64]})
    assert got == str(list(wide.state_dict()[entry].shape))
    assert want == str(list(narrow.state_dict()[entry].shape))
    assert got != want


def test_load_generator_without_gefl_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(_cvae_f_small().state_dict(), str(path))
    with pytest.raises(GeflError, match="lacks the metadata family, preset, options"):
        load_generator(path)


def test_load_generator_missing_file(tmp_path):
    with pytest.raises(GeflError, match="does not exist"):
        load_generator(tmp_path / "nothing.safetensors")
    with pytest.raises(GeflError, match="generator.safetensors does not exist"):
        load_generator(tmp_path)  # a directory without weights/


# --------------------------------------------------------------------------- config


def test_config_refuses_an_image_family_for_gefl_f():
    with pytest.raises(GeflError, match="'cvae'") as err:
        config_from_dict({"algorithm": "gefl-f", "gefl": {"generator": {"family": "cvae"}}})
    msg = str(err.value)
    for family in list_generators(FEATURE):
        assert family in msg
    assert "dcgan," not in msg and not msg.rstrip().endswith("ddpm")


def test_config_refuses_a_feature_family_for_gefl():
    with pytest.raises(GeflError, match="'cvae-f'"):
        config_from_dict({"algorithm": "gefl", "gefl": {"generator": {"family": "cvae-f"}}})


def test_config_accepts_an_image_family_for_gefl():
    cfg = config_from_dict({"algorithm": "gefl", "gefl": {"generator": {"family": "cvae"}}})
    assert cfg.gefl.generator.family == "cvae"
    assert cfg.gefl.generator.preset == GeneratorConfig().preset


def test_config_refuses_an_unknown_generator_option():
    with pytest.raises(GeflError, match="'depth'.*widths, latent"):
        config_from_dict({"algorithm": "gefl-f", "gefl": {"generator": {"family": "cvae-f", "options": {"depth": 3}}}})
    cfg = config_from_dict({"algorithm": "gefl-f",
                            "gefl": {"generator": {"family": "cvae-f", "options": {"latent": 8}}}})
    assert cfg.gefl.generator.options == {"latent": 8}


def test_config_refuses_an_unknown_wire_dtype():
    with pytest.raises(GeflError, match="wire_dtype.*'int4'"):
        config_from_dict({"gefl": {"generator": {"wire_dtype": "int4"}}})
    assert config_from_dict({"gefl": {"generator": {"wire_dtype": "float32"}}}).gefl.generator.wire_dtype == "float32"


# --------------------------------------------------------------------------- CVAE's class prior


def _cvae_f_class_prior(components: int = 1) -> torch.nn.Module:
    return build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "small",
                           {"prior": "class", "prior_components": components})


def _two_modes(n: int = 400) -> torch.Tensor:
    """Codes of one class in two clusters, at -3 and +3 along the first latent dimension."""
    codes = 0.3 * torch.randn(n, 16)
    codes[:, 0] += torch.where(torch.arange(n) % 2 == 0, -3.0, 3.0)
    return codes


@pytest.mark.parametrize("components", [1, 3])
def test_class_prior_statistics_add_up_to_the_pooled_data_over_clients(components):
    """Two clients summarise their own data with the generator they both received; the
    aggregated statistics must be those of the two clients' data pooled (one EM step over the
    federation), though the generator weights travel as float16."""
    torch.manual_seed(0)
    gen = _cvae_f_class_prior(components)
    x, _ = _real_batch("cvae-f", 64)
    y = torch.arange(64) % 3
    gen.summarise(x, y)  # a mixture to start the E-step from, as a later round would have
    received = {k: v.clone() for k, v in gen.state_dict().items()}
    parts = []
    for part in (slice(0, 40), slice(40, 64), slice(0, 64)):
        gen.load_state_dict(received)
        gen.summarise(x[part], y[part])
        parts.append({k: v.clone() for k, v in gen.state_dict().items()})
    pooled = parts.pop()
    algorithm = make_algorithm(config_from_dict({"algorithm": "gefl-f"}))
    wire = decode_state(algorithm.encode_generator(parts[0]))
    assert wire["stats.moment"].dtype == torch.float32 and wire["decoder.0.weight"].dtype == torch.float16
    results = [ClientResult(i, "cnn3", GENERATOR, algorithm.encode_generator(p), 32, 0.0) for i, p in enumerate(parts)]
    merged = algorithm.aggregate(GENERATOR, GlobalState({}, received), results).generator
    assert merged["stats.count"].shape == (CLASSES, components)
    assert merged["stats.count"].sum(1).tolist() == pytest.approx([22.0, 21.0, 21.0] + [0.0] * 7)
    for key in ("stats.count", "stats.sum", "stats.moment"):
        assert torch.allclose(merged[key], pooled[key], atol=1e-4), key


def test_class_prior_under_partial_participation_keeps_every_client_that_has_reported():
    """With a fraction of the clients per round, the global statistics are the sum of each
    client's latest: a client that reports again replaces its own, and one that sat the round
    out still counts. They survive a checkpoint, which refuses them for another generator."""
    torch.manual_seed(0)
    gen = _cvae_f_class_prior(2)
    x, _ = _real_batch("cvae-f", 60)
    y = torch.arange(60) % 3
    received = {k: v.clone() for k, v in gen.state_dict().items()}

    def summary_of(part: slice) -> dict[str, torch.Tensor]:
        gen.load_state_dict(received)
        gen.summarise(x[part], y[part])
        return {k: v.clone() for k, v in gen.state_dict().items()}

    algorithm = make_algorithm(config_from_dict({"algorithm": "gefl-f", "client_fraction": 0.5, "gefl": {
        "generator": {"preset": "small", "options": {"prior": "class", "prior_components": 2}}}}))
    c0, c1, c1_again = summary_of(slice(0, 20)), summary_of(slice(20, 40)), summary_of(slice(40, 60))

    def result(client: int, state: dict) -> ClientResult:
        return ClientResult(client, "cnn3", GENERATOR, algorithm.encode_generator(state), 20, 0.0)

    first = algorithm.aggregate(GENERATOR, GlobalState({}, received), [result(0, c0), result(1, c1)])
    second = algorithm.aggregate(GENERATOR, first, [result(1, c1_again)])  # client 0 sits this round out
    assert sorted(second.client_stats) == [0, 1]
    for key in ("stats.count", "stats.sum", "stats.moment"):
        assert torch.allclose(second.generator[key], c0[key] + c1_again[key], atol=1e-5), key
    assert second.generator["stats.count"].sum().item() == pytest.approx(40.0)  # not 20 (round), not 60 (stale)

    head = algorithm.prepare_round(HEAD, second, CLASSES)  # the phase is over: only the sum is kept
    assert head.client_stats == {} and head.generator is second.generator
    assert not any(k.startswith("client_stats/") for k in state_arrays(head))

    template = GlobalState({}, received)
    restored = restore_global_state(state_arrays(second), algorithm, template, 1, CLASSES)
    assert sorted(restored.client_stats) == [0, 1]
    assert all(torch.equal(restored.client_stats[c][k], second.client_stats[c][k])
               for c in (0, 1) for k in second.client_stats[c])
    other = make_algorithm(config_from_dict({"algorithm": "gefl-f", "gefl": {"generator": {
        "preset": "small", "options": {"prior": "class", "prior_components": 3}}}}))
    arrays = state_arrays(GlobalState({}, None, second.client_stats))
    with pytest.raises(GeflError, match="statistics but no generator"):
        restore_global_state(arrays, other, template, 1, CLASSES)
    arrays = {**state_arrays(second), **{f"generator/{k}": v.numpy() for k, v in
                                        other.new_generator(1, CLASSES).state_dict().items()}}
    with pytest.raises(GeflError, match="statistics of client 0 do not match"):
        restore_global_state(arrays, other, template, 1, CLASSES)


def test_class_prior_one_gaussian_per_class_and_the_standard_prior_for_an_unseen_class():
    gen = _cvae_f_class_prior()
    codes = torch.tensor([[2.0] + [0.0] * 15, [4.0] + [0.0] * 15, [-3.0] + [0.0] * 15])
    gen.stats.record(codes, torch.full_like(codes, -30.0), torch.tensor([1, 1, 2]))
    share, mean, root, seen = gen.stats.mixture()
    assert seen.tolist() == [False, True, True] + [False] * 7
    assert mean[1, 0, 0].item() == pytest.approx(3.0) and mean[2, 0, 0].item() == pytest.approx(-3.0)
    cov = root[1, 0] @ root[1, 0].T
    assert cov[0, 0].item() == pytest.approx(1.0, abs=1e-4) and cov[1:, 1:].abs().max().item() < 1e-4
    _, from_mixture = gen.stats.draw(torch.tensor([0, 0, 1, 2]), torch.randn(4, 16))
    assert from_mixture.tolist() == [False, False, True, True]  # sample() draws class 0 from N(0, I)
    torch.manual_seed(0)
    z, _ = gen.stats.draw(torch.full((4000,), 1), torch.randn(4000, 16))
    assert z[:, 0].mean().item() == pytest.approx(3.0, abs=0.05)
    assert z[:, 0].std().item() == pytest.approx(1.0, abs=0.05)
    assert z[:, 1:].abs().max().item() < 0.05


def test_class_prior_mixture_finds_a_class_with_two_modes_by_federated_em():
    """Rounds of E-steps on two clients' codes, summed as the aggregator sums them: the two
    components settle on the two clusters (from the split along the class's principal axis),
    and draws fall near them, not between them."""
    torch.manual_seed(0)
    stats = _cvae_f_class_prior(2).stats
    codes, labels = _two_modes(), torch.full((400,), 4)
    logvar = torch.full_like(codes, -6.0)
    client = _cvae_f_class_prior(2).stats
    for _ in range(10):
        received = {k: v.clone() for k, v in stats.state_dict().items()}
        summed = None
        for part in (slice(0, 150), slice(150, 400)):
            client.load_state_dict(received)
            client.record(codes[part], logvar[part], labels[part])
            summed = {k: v.clone() if summed is None else summed[k] + v for k, v in client.state_dict().items()}
        stats.load_state_dict(summed)
    share, mean, root, seen = stats.mixture()
    assert share[4].tolist() == pytest.approx([0.5, 0.5], abs=0.05)
    assert sorted(mean[4, :, 0].tolist()) == pytest.approx([-3.0, 3.0], abs=0.1)
    z, _ = stats.draw(torch.full((1000,), 4), torch.randn(1000, 16))
    assert (z[:, 0].abs() > 1.5).float().mean() > 0.99  # one Gaussian would put a third in between
    assert (z[:, 0] > 0).float().mean() == pytest.approx(0.5, abs=0.06)


def test_class_prior_mixture_is_kept_until_its_statistics_change():
    """A head round draws every batch from one mixture, fitted once; new statistics (an E-step,
    a received state, an in-place write) are fitted again, never sampled from the old fit."""
    gen = _cvae_f_class_prior(2)
    codes, labels = _two_modes(100), torch.full((100,), 2)
    logvar = torch.full_like(codes, -6.0)
    gen.stats.record(codes, logvar, labels)
    first = gen.stats.mixture()
    assert all(a is b for a, b in zip(first, gen.stats.mixture()))  # not fitted again
    fresh = _cvae_f_class_prior(2)
    fresh.load_state_dict(gen.state_dict())
    gen.eval(), fresh.eval()
    torch.manual_seed(1)
    kept = gen.sample(torch.full((8,), 2))
    torch.manual_seed(1)
    assert torch.equal(kept, fresh.sample(torch.full((8,), 2)))  # the same draws as a fit of its own

    def mean_code() -> float:  # class 2's mean code along the first axis, from the mixture
        share, mean, _, _ = gen.stats.mixture()
        return (share[2, :, None] * mean[2]).sum(0)[0].item()

    before = mean_code()
    gen.stats.record(codes + 5.0, logvar, labels)  # an E-step on other codes
    assert mean_code() == pytest.approx(before + 5.0, abs=1e-3)
    gen.load_state_dict(fresh.state_dict())  # a received state
    assert mean_code() == pytest.approx(before, abs=1e-5)
    gen.stats.sum[2] += 2.0 * gen.stats.count[2, :, None]  # an in-place write
    assert mean_code() == pytest.approx(before + 2.0, abs=1e-3)


def test_class_prior_e_step_survives_an_indefinite_covariance():
    """Summed statistics whose covariance is not positive definite (rounding in float32 sums of
    codes far from the origin, or a client's slightly inconsistent sums): the next E-step must
    still split the codes by responsibility instead of failing on a Cholesky factorisation."""
    stats = _cvae_f_class_prior(2).stats
    codes, labels = _two_modes(100), torch.full((100,), 2)
    logvar = torch.full_like(codes, -30.0)
    stats.record(codes, logvar, labels)  # the class's Gaussian, to be split by the next E-step
    stats.moment[2] -= 0.5 * stats.count[2, :, None, None] * torch.eye(16)  # variances 0.09 - 0.5
    resp = stats.responsibilities(codes, labels)
    assert torch.isfinite(resp).all() and torch.allclose(resp.sum(1), torch.ones(100))
    assert (resp.argmax(1) == resp.argmax(1)[0]).float().mean() == pytest.approx(0.5, abs=0.1)  # still two modes


def test_class_prior_with_more_components_than_principal_directions_is_refused():
    with pytest.raises(GeflError, match="prior_components can be at most 32 .*got 33"):
        build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "light", {"prior_components": 33})


def test_class_prior_needs_matching_statistics_in_a_checkpoint():
    with pytest.raises(GeflError, match="missing stats.count"):
        check_generator_state(_cvae_f_class_prior(), _cvae_f_small().state_dict(), "old.safetensors")


@pytest.mark.parametrize("option, value", [("prior", "uniform"), ("decoder_variance", "learned"),
                                           ("prior_components", 0)])
def test_cvae_option_with_an_unknown_value_names_it(option, value):
    with pytest.raises(GeflError, match=f"{option} must be .*{value!r}"):
        build_generator("cvae-f", FEATURE_SHAPE, CLASSES, "light", {option: value})


@pytest.mark.parametrize("generator_batch, steps", [(None, 2), (30, 4)])
def test_generator_rounds_take_their_own_batch_size(fmnist, monkeypatch, generator_batch, steps):
    """`gefl.generator.batch_size` sets the generator's local steps (null: train.batch_size): one
    epoch of 120 real features is two steps at batch 64 and four at 30."""
    from gefl.algorithms import ClientTask
    from gefl.generators.cvae import CVAEF
    from gefl.protocol.wire import encode_state

    seen: list[int] = []
    real_step = CVAEF.train_step
    monkeypatch.setattr(CVAEF, "train_step", lambda self, x, y, opt: seen.append(len(y)) or real_step(self, x, y, opt))
    algo = make_algorithm(config_from_dict({
        "algorithm": "gefl-f", "tiers": ["cnn3"], "num_clients": 1, "train": {"batch_size": 64},
        "gefl": {"generator": {"preset": "light", "local_epochs": 1, "batch_size": generator_batch}}}))
    state = algo.prepare_round(GENERATOR, algo.init_state(["cnn3"], 1, 10), 10)
    task = ClientTask(1, GENERATOR, 0, "cnn3", 1, encode_state(state.models["cnn3"]),
                      algo.encode_generator(state.generator))
    algo.client_step(task, Split(fmnist.train.images[:120], fmnist.train.labels[:120]), 10)
    assert len(seen) == steps and max(seen) == (generator_batch or 64)


def test_config_refuses_a_generator_batch_size_below_one():
    with pytest.raises(GeflError, match="'gefl.generator.batch_size' must be positive, got 0"):
        config_from_dict({"gefl": {"generator": {"batch_size": 0}}})
