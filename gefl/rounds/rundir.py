"""The run directory every run writes, so scripts and plots can read any run the same way.

    config.yaml       the resolved config (every key, defaults included)
    partition.json    per client: tier, sample count, label histogram
    metrics.jsonl     one JSON object per round (loss, participants, accuracy when evaluated)
    summary.json      per-tier best and final accuracy, means, wall time
    weights/<tier>.safetensors, weights/generator.safetensors   final global weights

and reads weights back (`load_tier`, `load_generator`) with checks that name what does not fit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _save_torch

from gefl.config import Config, to_dict
from gefl.errors import GeflError
from gefl.files import atomic_write
from gefl.protocol.wire import canonical
from gefl.tiers.models import TierNet, get_model

if TYPE_CHECKING:
    from gefl.algorithms import GlobalState
    from gefl.data import Dataset
    from gefl.generators import Generator


def unwritable(path: Path, exc: OSError) -> GeflError:
    """The one-paragraph error for a file of the run that cannot be written (read-only file system, no
    space left, a directory where a file should be, no permission): what, where and what to do."""
    return GeflError(f"cannot write {path}: {exc.strerror or exc}. The files written before are as they were; free "
                     "space or fix the directory's permissions (or pick another --out / --state-dir), then run the "
                     "command again")


MAX_CLASSES = 100_000
"""The most classes a dataset may have (the aggregator's bound on label histograms too)."""


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def check_target(out: str | Path | None) -> None:
        """Fail before any work is done if `out` would mix two runs."""
        if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
            raise GeflError(f"output directory {out} exists and is not empty; pick a new --out")

    @classmethod
    def create(cls, out: str | Path | None, cfg: Config) -> RunDir:
        cls.check_target(out)
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path("runs") / f"{cfg.name}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = Path("runs") / f"{cfg.name}-{stamp}-{n}"
        else:
            path = Path(out)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GeflError(f"cannot create run directory {path}: {exc}") from exc
        run = cls(path)
        try:
            (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        except OSError as exc:
            raise unwritable(path / "config.yaml", exc) from exc
        return run

    @classmethod
    def resume_or_create(cls, path: str | Path, cfg: Config) -> RunDir:
        """The run directory of a run that may have stopped half-way (the aggregator's state dir):
        created if new, reopened if it holds this same config, refused if it holds another."""
        path = Path(path)
        saved = path / "config.yaml"
        if not saved.is_file():
            return cls.create(path, cfg)
        before = yaml.safe_load(saved.read_text()) or {}
        now = to_dict(cfg)
        changed = sorted(_diff(before, now))
        if changed:
            raise GeflError(f"{path} holds a run with a different config ({', '.join(changed[:5])} differ); "
                            "resume it with the same config, or pick a new state directory")
        return cls(path)

    def truncate_metrics(self, rounds: int) -> None:
        """Keep the metrics of rounds 1..rounds only: a resumed run writes the later ones again."""
        metrics = self.path / "metrics.jsonl"
        if not metrics.exists():
            return
        keep = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("round", 0) <= rounds]
        try:
            atomic_write(metrics, "".join(line + "\n" for line in keep).encode())
        except OSError as exc:
            raise unwritable(metrics, exc) from exc

    def write_json(self, name: str, data: Any) -> None:
        """Atomic: a reader never sees half a file, a crash never leaves one."""
        try:
            atomic_write(self.path / name, (json.dumps(data, indent=2) + "\n").encode())
        except OSError as exc:
            raise unwritable(self.path / name, exc) from exc

    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise unwritable(self.path / "metrics.jsonl", exc) from exc

    def save_weights(self, state: GlobalState, dataset: Dataset, cfg: Config) -> None:
        try:
            self._save_weights(state, dataset, cfg)
        except OSError as exc:
            raise unwritable(self.path / "weights", exc) from exc

    def _save_weights(self, state: GlobalState, dataset: Dataset, cfg: Config) -> None:
        weights = self.path / "weights"
        weights.mkdir(exist_ok=True)
        common = {
            "dataset": dataset.name, "in_channels": str(dataset.in_channels),
            "num_classes": str(dataset.num_classes), "classes": json.dumps(dataset.classes),
            "algorithm": cfg.algorithm,
        }
        for tier, sd in sorted(state.models.items()):
            _save_weight_file(sd, weights / f"{tier}.safetensors", {**common, "tier": tier})
        if state.generator is not None:
            g = cfg.gefl.generator
            _save_weight_file(state.generator, weights / "generator.safetensors",
                              {**common, "family": g.family, "preset": json.dumps(g.preset, sort_keys=True),
                               "options": json.dumps(g.options, sort_keys=True)})


def _save_weight_file(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """One weight file, byte for byte the same for the same tensors and metadata (see `wire.canonical`)."""
    atomic_write(path, canonical(_save_torch({k: v.contiguous() for k, v in state.items()}, metadata=metadata)))


def load_generator(path: str | Path, family: str | None = None) -> tuple[Generator, dict[str, str]]:
    """A trained generator from a run directory or a generator.safetensors file, and its metadata.

    The file says which family, preset and options built it, so the generator is rebuilt from
    that and the weights are checked against it entry by entry: a file from another family or
    preset, a truncated or corrupted file, or (with `family`) a generator of an unexpected family
    fails with what does not match, never with a half-loaded model.
    """
    from gefl.generators import build_generator, check_generator_state, generator_spec

    path = Path(path)
    file = path / "weights" / "generator.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise GeflError(f"{file} does not exist: is {path} the run directory of a gefl or gefl-f run "
                        "that reached its generator phase?")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as exc:
        raise GeflError(f"{file} is not a readable generator checkpoint (corrupted or truncated?): {exc}") from exc
    missing = [k for k in ("family", "preset", "options", "in_channels", "num_classes") if k not in meta]
    if missing:
        raise GeflError(f"{file} lacks the metadata {', '.join(missing)}: it was not written by this version of gefl")
    if family is not None and meta["family"] != family:
        raise GeflError(f"{file} holds a {meta['family']!r} generator, expected {family!r}")
    try:
        preset, options = json.loads(meta["preset"]), json.loads(meta["options"])
        in_channels, num_classes = int(meta["in_channels"]), int(meta["num_classes"])
    except (ValueError, RecursionError) as exc:
        raise GeflError(f"{file}: unreadable metadata ({type(exc).__name__})") from None
    if in_channels not in (1, 3) or not 1 <= num_classes <= MAX_CLASSES:
        raise GeflError(f"{file}: metadata in_channels {in_channels} / num_classes {num_classes} is not a dataset's "
                        f"(1 or 3 channels, 1 to {MAX_CLASSES:,} classes)")
    from gefl.algorithms import generated_shape

    spec = generator_spec(meta["family"])
    shape = generated_shape(spec.level, in_channels)
    # Built first without memory, so that the file's shapes, which its size bounds, are checked before
    # its metadata can make us allocate anything (widths of a million would ask for gigabytes).
    with torch.device("meta"):
        blueprint = build_generator(spec.family, shape, num_classes, preset, options)
    check_generator_state(blueprint, state, str(file))
    generator = build_generator(spec.family, shape, num_classes, preset, options)
    generator.load_state_dict(state)
    return generator.eval(), meta


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_tiers(run_dir: Path) -> list[str]:
    weights = run_dir / "weights"
    tiers = sorted(p.stem for p in weights.glob("*.safetensors") if p.stem != "generator")
    if not tiers:
        raise GeflError(f"{run_dir} holds no trained tiers (no weights/<tier>.safetensors): is it a run directory "
                        "written by `gefl simulate` or the aggregator?")
    return tiers


def load_tier(run_dir: Path, tier: str) -> tuple[TierNet, dict[str, str]]:
    """The trained network of `tier` in eval mode, and its weight file's metadata."""
    path = run_dir / "weights" / f"{tier}.safetensors"
    if not path.is_file():
        raise GeflError(f"{run_dir} has no weights for tier {tier!r}; it has: {', '.join(run_tiers(run_dir))}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise GeflError(f"cannot read {path}: {exc}") from None
    for key in ("in_channels", "num_classes", "classes", "dataset"):
        if key not in meta:
            raise GeflError(f"{path} lacks the metadata field {key!r}; was it written by gefl?")
    model = get_model(tier, int(meta["in_channels"]), int(meta["num_classes"]))
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise GeflError(f"{path}: {key} has shape {tuple(value.shape)}, tier {tier!r} expects "
                            f"{tuple(expected[key].shape)}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GeflError(f"{path} does not fit tier {tier!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    return model.eval(), meta
