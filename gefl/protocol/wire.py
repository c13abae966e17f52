"""Tensors as bytes: the one encoding used between processes, on the wire and in checkpoints.

It is the safetensors format (a JSON header of names, dtypes and shapes, then raw data), so
decoding never executes anything: no pickle anywhere a peer's bytes are read. The module needs
numpy only: transports, the aggregator's bookkeeping and the benchmark's echo clients move
payloads without importing torch; `decode_state` imports it when a caller wants tensors back.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_numpy
from safetensors.numpy import save as _save_numpy

from gefl.errors import GeflError

if TYPE_CHECKING:
    import torch

    StateDict = dict[str, torch.Tensor]

CHUNK_BYTES = 1 << 20
"""Payloads travel in chunks of 1 MiB on every transport, far below gRPC's and Mosquitto's limits."""


def encode_arrays(arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    # np.ascontiguousarray would turn 0-d arrays (BatchNorm's step counters) into 1-d ones.
    return canonical(_save_numpy({k: np.asarray(v).copy(order="C") for k, v in arrays.items()}, metadata=metadata))


def canonical(data: bytes) -> bytes:
    """Safetensors bytes with their header in one fixed order, so equal tensors and metadata give equal bytes.

    The safetensors library keeps the metadata in a hash map whose order changes from process to
    process; this rewrites the header with the metadata keys sorted and the tensors in data order
    (the data itself does not move, its offsets are relative to the end of the header).
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    for name in sorted(header, key=lambda n: (header[n]["data_offsets"], n)):
        ordered[name] = header[name]
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        return _load_numpy(bytes(data))
    except (SafetensorError, ValueError) as exc:
        raise GeflError(f"cannot decode tensors: {exc}") from exc


def encode_state(state: Mapping[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A torch state dict as safetensors bytes (tensors go through numpy, so torch is not imported)."""
    return encode_arrays({k: v.detach().cpu().numpy() for k, v in state.items()}, metadata)


def decode_state(data: bytes) -> StateDict:
    import torch

    return {k: torch.from_numpy(v) for k, v in decode_arrays(data).items()}


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and values, in name order: equal exactly when the arrays are."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """`data` in consecutive slices of at most `size` bytes (one empty slice for empty data)."""
    view = memoryview(data)
    if not view:
        yield view
        return
    for start in range(0, len(view), size):
        yield view[start:start + size]
