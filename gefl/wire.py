"""Tensors as bytes: the one encoding used between processes, on the wire and in checkpoints.

It is the safetensors format (a JSON header of names, dtypes and shapes, then raw data), so
decoding never executes anything: no pickle anywhere a peer's bytes are read.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from gefl.errors import GeflError

StateDict = dict[str, torch.Tensor]


def encode_state(state: StateDict, metadata: dict[str, str] | None = None) -> bytes:
    return _save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)


def decode_state(data: bytes) -> StateDict:
    try:
        return _load(data)
    except (SafetensorError, ValueError) as exc:
        raise GeflError(f"cannot decode tensors: {exc}") from exc
