import pytest

from gefl.config import Config, load_config
from gefl.errors import GeflError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_setting():
    cfg = load_config()
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.local_epochs) == (0.1, 64, 5)
    assert cfg.num_clients == 10 and cfg.partition.samples_per_client == 600
    assert (cfg.gefl.warmup_rounds, cfg.gefl.generator_rounds, cfg.rounds) == (20, 100, 50)
    assert cfg.tier_of(0) == "cnn2" and cfg.tier_of(9) == "cnn5c" and cfg.tier_of(10) == "cnn2"


def test_unknown_keys_are_named_with_their_section(tmp_path):
    with pytest.raises(GeflError, match="unknown config key 'rounds_total'"):
        load_config(write(tmp_path, "rounds_total: 3\n"))
    with pytest.raises(GeflError, match=r"unknown config key train\.'local_epoch'.*local_epochs"):
        load_config(write(tmp_path, "train:\n  local_epoch: 1\n"))


def test_wrong_types_and_ranges_are_named(tmp_path):
    with pytest.raises(GeflError, match="'train.lr' must be a number"):
        load_config(write(tmp_path, "train: {lr: fast}\n"))
    with pytest.raises(GeflError, match="'num_clients' must be an integer"):
        load_config(write(tmp_path, "num_clients: 2.5\n"))
    with pytest.raises(GeflError, match="'client_fraction' must be in"):
        load_config(write(tmp_path, "client_fraction: 0\n"))
    with pytest.raises(GeflError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(GeflError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(GeflError, match="unknown algorithm 'fedsgd'; valid algorithms are: avgkd, fedavg, feddf"):
        load_config(overrides=["algorithm=fedsgd"])
    with pytest.raises(GeflError, match="unknown dataset 'imagenet'.*fashion-mnist"):
        load_config(overrides=["dataset=imagenet"])
    with pytest.raises(GeflError, match="unknown tier 'resnet'.*cnn2"):
        load_config(overrides=["tiers=[cnn2, resnet]"])


def test_overrides_are_read_as_yaml_and_reach_nested_keys(tmp_path):
    cfg = load_config(write(tmp_path, "rounds: 7\n"), ["train.lr=0.05", "tiers=[cnn3, cnn4]", "data_dir=null"])
    assert isinstance(cfg, Config)
    assert cfg.rounds == 7 and cfg.train.lr == 0.05 and cfg.tiers == ["cnn3", "cnn4"] and cfg.data_dir is None
    with pytest.raises(GeflError, match="key=value"):
        load_config(overrides=["train.lr"])
    with pytest.raises(GeflError, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_all_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    # The tier catalogue and the device profiles are not federation configs.
    files = sorted(f for f in root.rglob("*.yaml") if f.name not in ("tiers.yaml", "devices.yaml"))
    assert len(files) >= 5
    for f in files:
        load_config(f)
