"""Run configuration: nested dataclasses (defined in gefl.schema), read from YAML, every key checked.

A config file only states what differs from the defaults in gefl.schema. An unknown key, a value of the
wrong type or an out-of-range value fails with the dotted key path named, because a silently
ignored typo ("local_epoch: 1") would produce a quietly wrong experiment.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gefl.algorithms import ALGORITHMS, generated_shape, generator_level
from gefl.data import EVAL_SPLITS, PARTITIONS, list_datasets
from gefl.errors import GeflError, unknown_name
from gefl.generators import build_generator, generator_options, list_generators
from gefl.schema import (
    AggregationConfig,
    Config,
    EvalConfig,
    FedDFConfig,
    GeflConfig,
    GeneratorConfig,
    NetworkConfig,
    PartitionConfig,
    RayConfig,
    TrainConfig,
)
from gefl.tiers.models import list_tiers

EXECUTORS = ("local", "ray")
"""Where `gefl simulate` trains its clients (config key `executor`)."""

__all__ = [
    "AggregationConfig", "Config", "EvalConfig", "FedDFConfig", "GeflConfig", "GeneratorConfig", "NetworkConfig",
    "PartitionConfig", "RayConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_from_yaml",
    "load_config", "parse_override", "to_dict", "validate",
]
"""The dataclasses live in gefl.schema (below the registries this module checks names against)."""


# --------------------------------------------------------------------------- conversion

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except GeflError as exc:
                errors.append(exc)
        raise errors[0] if errors else GeflError(f"config key {key!r} may not be null")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise GeflError(f"config key {key!r} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise GeflError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise GeflError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GeflError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GeflError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise GeflError(f"config key {key!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GeflError(f"config section {prefix or 'top level'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise GeflError(
            f"unknown config key {where}{unknown[0]!r}; valid keys{' under ' + prefix if prefix else ''} are: "
            + ", ".join(sorted(names))
        )
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise GeflError(f"config key {key!r} must be positive, got {value}")


def validate(cfg: Config) -> Config:
    """Range checks and name checks against the registries (a user's own tiers, datasets,
    generator families and algorithms included)."""
    ALGORITHMS.get(cfg.algorithm)  # raises, listing the registered algorithms
    if cfg.dataset not in list_datasets():
        raise unknown_name("dataset", cfg.dataset, list_datasets())
    if not cfg.tiers:
        raise GeflError("config key 'tiers' must list at least one tier")
    for tier in cfg.tiers:
        if tier not in list_tiers():
            raise unknown_name("tier", tier, list_tiers())
    if cfg.partition.kind not in PARTITIONS:
        raise unknown_name("partition", cfg.partition.kind, PARTITIONS)
    if cfg.feddf.public_dataset is not None and cfg.feddf.public_dataset not in list_datasets():
        raise unknown_name("dataset", cfg.feddf.public_dataset, list_datasets())
    gen = cfg.gefl.generator
    level = generator_level(cfg.algorithm)
    if level is not None:
        if gen.family not in list_generators(level):
            raise GeflError(f"unknown {level}-level generator family {gen.family!r} (gefl.generator.family); "
                            f"{cfg.algorithm} takes one of: {', '.join(list_generators(level))}")
        generator_options(gen.family, gen.preset, gen.options)
        import torch

        with torch.device("meta"):  # builds the shapes only: bad options fail now, not after the warm-up
            build_generator(gen.family, generated_shape(level, 1), 10, gen.preset, gen.options)
    if gen.wire_dtype not in ("float16", "float32"):
        raise GeflError(f"config key 'gefl.generator.wire_dtype' must be float16 or float32, got {gen.wire_dtype!r}")
    if len(gen.betas) != 2 or not all(0 <= b < 1 for b in gen.betas):
        raise GeflError(f"config key 'gefl.generator.betas' must be two numbers in [0, 1), got {gen.betas}")
    if cfg.eval.split not in EVAL_SPLITS:
        raise unknown_name("eval.split", cfg.eval.split, EVAL_SPLITS)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise GeflError(f"config key 'device' must be auto, cpu or cuda, got {cfg.device!r}")
    for key, value in [
        ("num_clients", cfg.num_clients), ("rounds", cfg.rounds), ("train.lr", cfg.train.lr),
        ("train.batch_size", cfg.train.batch_size), ("train.local_epochs", cfg.train.local_epochs),
        ("eval.every", cfg.eval.every), ("eval.batch_size", cfg.eval.batch_size),
        ("eval.validation_size", cfg.eval.validation_size),
        ("partition.alpha", cfg.partition.alpha), ("network.round_timeout", cfg.network.round_timeout),
        ("network.heartbeat_interval", cfg.network.heartbeat_interval),
        ("network.heartbeat_timeout", cfg.network.heartbeat_timeout),
        ("feddf.public_size", cfg.feddf.public_size), ("feddf.steps", cfg.feddf.steps), ("feddf.lr", cfg.feddf.lr),
        ("feddf.temperature", cfg.feddf.temperature),
    ]:
        _positive(key, value)
    for key, value in [
        ("gefl.warmup_rounds", cfg.gefl.warmup_rounds), ("gefl.generator_rounds", cfg.gefl.generator_rounds),
        ("gefl.generated_passes", cfg.gefl.generated_passes),
        ("gefl.generator.lr", cfg.gefl.generator.lr), ("gefl.generator.weight_decay", cfg.gefl.generator.weight_decay),
        ("gefl.generator.local_epochs", cfg.gefl.generator.local_epochs), ("train.momentum", cfg.train.momentum),
        ("train.weight_decay", cfg.train.weight_decay), ("train.prox_mu", cfg.train.prox_mu),
    ]:
        if value < 0:
            raise GeflError(f"config key {key!r} must not be negative, got {value}")
    if cfg.partition.samples_per_client is not None:
        _positive("partition.samples_per_client", cfg.partition.samples_per_client)
    if gen.batch_size is not None:
        _positive("gefl.generator.batch_size", gen.batch_size)
    if not 0 < cfg.client_fraction <= 1:
        raise GeflError(f"config key 'client_fraction' must be in (0, 1], got {cfg.client_fraction}")
    if cfg.network.min_clients is not None and not 1 <= cfg.network.min_clients <= cfg.num_clients:
        raise GeflError(f"config key 'network.min_clients' must be between 1 and num_clients ({cfg.num_clients}), "
                        f"got {cfg.network.min_clients}")
    if cfg.network.heartbeat_timeout <= cfg.network.heartbeat_interval:
        raise GeflError("config key 'network.heartbeat_timeout' must be longer than network.heartbeat_interval "
                        f"({cfg.network.heartbeat_timeout} <= {cfg.network.heartbeat_interval})")
    if cfg.workers is not None and cfg.workers < 1:
        raise GeflError(f"config key 'workers' must be at least 1 (or null for one per core), got {cfg.workers}")
    if cfg.executor not in EXECUTORS:
        raise unknown_name("executor", cfg.executor, EXECUTORS)
    _positive("ray.cpus", cfg.ray.cpus)
    host, sep, port = cfg.ray.address.rpartition(":")
    if cfg.ray.address not in ("", "auto") and not (sep and host and port.isdigit()):
        raise GeflError(f"config key 'ray.address' must be '' (a Ray instance of the run's own), 'auto' (the cluster "
                        f"this machine joined with `ray start`) or HOST:PORT of a head, got {cfg.ray.address!r}")
    if cfg.ray.gpus < 0:
        raise GeflError(f"config key 'ray.gpus' must not be negative, got {cfg.ray.gpus}")
    if cfg.executor == "ray" and (cfg.device == "cuda") != (cfg.ray.gpus > 0) and cfg.device != "auto":
        raise GeflError(f"with executor ray, the client actors train where `ray.gpus` puts them: device "
                        f"{cfg.device!r} with ray.gpus {cfg.ray.gpus} contradict each other (set ray.gpus above 0 "
                        "for cuda, 0 for cpu, or device auto)")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.05' -> (['train', 'lr'], 0.05); the value is read as YAML ('[a, b]', 'null', 'true')."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise GeflError(f"--set expects key=value (for example train.lr=0.05), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise GeflError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise GeflError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None = defaults), apply `key=value` overrides, check everything."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GeflError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise GeflError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise GeflError(f"config file {p} must hold a mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    return validate(_from_dict(Config, data))


def config_from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, data))


def config_from_yaml(text: str, source: str) -> Config:
    """A config received as YAML text (a client gets its run's config from the aggregator): any
    text that is not a valid config, however malformed or deeply nested, is a GeflError naming `source`."""
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise GeflError(f"the run config from {source} is not valid YAML ({type(exc).__name__})") from None
    return config_from_dict(data)
