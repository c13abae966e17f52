"""The checkpoint a run rewrites after every round, so a killed run resumes where it stopped.

One file format for every driver: `gefl simulate` writes it into the run directory, `gefl
aggregator serve` into its state directory (which is a run directory). The tensors are the global
state (every tier's network, the generator, and each client's latest generator statistics); the
metadata is JSON the driver fills (rounds completed, scores, the aggregator's client registry),
sealed by a digest over both, so a bit flip or an edit is refused rather than resumed from.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gefl.errors import GeflError
from gefl.files import atomic_write
from gefl.protocol.wire import arrays_digest, decode_arrays, encode_arrays

if TYPE_CHECKING:  # the aggregator's coordinator writes checkpoints without importing torch
    import torch

    from gefl.algorithms import Algorithm, GlobalState

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 3
"""3: one layout for `gefl simulate` and the aggregator (the round loop's: completed, elapsed_s, logic, clock,
clients); 2 had one per side."""


def digest(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """sha256 over the tensors and every other field of the checkpoint: any change to either shows."""
    return hashlib.sha256(f"{arrays_digest(arrays)}|{json.dumps(meta, sort_keys=True)}".encode()).hexdigest()


def nonfinite_arrays(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays holding NaN or infinity."""
    return sorted(k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all())


def state_arrays(state: GlobalState) -> dict[str, np.ndarray]:
    """The global state as named arrays: model/<tier>/<key>, generator/<key> and
    client_stats/<client>/<key>."""
    arrays = {f"model/{t}/{k}": v.numpy() for t, sd in state.models.items() for k, v in sd.items()}
    if state.generator is not None:
        arrays.update({f"generator/{k}": v.numpy() for k, v in state.generator.items()})
    arrays.update({f"client_stats/{c}/{k}": v.numpy() for c, sd in state.client_stats.items() for k, v in sd.items()})
    return arrays


def split_state_arrays(arrays: dict[str, np.ndarray], tiers: list[str]) -> GlobalState:
    """The inverse of `state_arrays`; a tier the run does not offer is refused by name."""
    import torch

    from gefl.algorithms import GlobalState

    models: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tiers}
    generator: dict[str, torch.Tensor] = {}
    client_stats: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "generator":
            generator[rest] = torch.from_numpy(value)
        elif kind == "client_stats":
            client, _, name = rest.partition("/")
            if not client.isdigit():
                raise GeflError(f"the checkpoint's entry {key!r} names no client id")
            client_stats.setdefault(int(client), {})[name] = torch.from_numpy(value)
        elif kind == "model":
            tier, _, name = rest.partition("/")
            if tier not in models:
                raise GeflError(f"the checkpoint holds tier {tier!r}, which this config does not offer")
            models[tier][name] = torch.from_numpy(value)
        else:
            raise GeflError(f"the checkpoint holds an entry {key!r} of no known kind (model/, generator/, "
                            "client_stats/)")
    return GlobalState(models, generator or None, client_stats)


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the checkpoint atomically; on failure the last good one stays and the error says so."""
    meta = {"format": FORMAT, **meta}
    meta["sha256"] = digest(arrays, meta)
    try:
        atomic_write(path, encode_arrays(arrays, {"gefl": json.dumps(meta, sort_keys=True)}))
    except OSError as exc:
        raise GeflError(f"cannot write the checkpoint {path}: {exc.strerror or exc}. The run stops; the last good "
                        "checkpoint is kept, so free space or fix the directory's permissions and start it again "
                        "on the same directory to resume") from exc


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint: its format, its digest and that every tensor is finite. The
    fields inside `meta` are the caller's to check (a digest is not a signature)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            meta = json.loads((f.metadata() or {})["gefl"])
    except Exception as exc:
        raise GeflError(f"cannot read the checkpoint {path}: {exc}; move it away to start afresh "
                        "(the run directory's other files stay valid)") from exc
    if not isinstance(meta, dict):
        raise GeflError(f"the checkpoint {path} is malformed (its metadata is not an object); restore it from a "
                        "backup, or move it away to start afresh")
    if meta.get("format") != FORMAT:
        raise GeflError(f"{path} has checkpoint format {meta.get('format')}, this gefl-edge reads format {FORMAT}: "
                        "finish the run with the gefl-edge that started it, or move the checkpoint away to start "
                        "afresh")
    arrays = decode_arrays(path.read_bytes())
    stored = meta.pop("sha256", None)
    if stored is None or not hmac.compare_digest(str(stored), digest(arrays, meta)):
        raise GeflError(f"the checkpoint {path} is damaged: its contents do not match the digest written with "
                        "them (a bit flip on disk, or an edit); resuming would go on from other weights than the "
                        "run had. Restore it from a backup, or move it away to start afresh")
    bad = nonfinite_arrays(arrays)
    if bad:
        raise GeflError(f"the checkpoint {path} holds non-finite values (in {', '.join(bad[:3])}): a run cannot "
                        "go on from them. Restore it from a backup, or move it away to start afresh")
    return arrays, meta


def restore_global_state(arrays: dict[str, np.ndarray], algorithm: Algorithm, template: GlobalState,
                         in_channels: int, num_classes: int) -> GlobalState:
    """The global state a checkpoint holds, checked against the run's own (`template`, as the
    config builds it): the same tiers with the same tensors, and a generator only where the
    algorithm has one, of the configured family and size."""
    from gefl.algorithms import GeneratorAlgorithm
    from gefl.generators import STATS_PREFIX, check_generator_state

    state = split_state_arrays(arrays, list(template.models))
    models, generator = state.models, state.generator or {}
    for tier, sd in models.items():
        if sd.keys() != template.models[tier].keys():
            raise GeflError(f"the checkpoint's {tier} weights do not match the model: was the config changed?")
    if generator:
        if not isinstance(algorithm, GeneratorAlgorithm):
            raise GeflError(f"the checkpoint holds a generator, but {algorithm.name} has none: was the config changed?")
        check_generator_state(algorithm.new_generator(in_channels, num_classes), generator,
                              "the checkpoint's generator")
    if state.client_stats and not generator:
        raise GeflError("the checkpoint holds clients' generator statistics but no generator: was it edited?")
    stats = {k: v for k, v in algorithm.new_generator(in_channels, num_classes).state_dict().items()
             if k.startswith(STATS_PREFIX)} if state.client_stats else {}
    for client, sd in state.client_stats.items():
        if sd.keys() != stats.keys() or any(tuple(sd[k].shape) != tuple(v.shape) for k, v in stats.items()):
            raise GeflError(f"the checkpoint's generator statistics of client {client} do not match the "
                            "configured generator's: was the config changed?")
    return state
