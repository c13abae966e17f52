"""The wire codec (numpy-only safetensors) and the client's reconnect backoff."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from gefl.edge_client.runtime import Backoff
from safetensors.torch import save

from gefl.errors import GeflError
from gefl.protocol.wire import arrays_digest, chunks, decode_arrays, decode_state, encode_state
from gefl.tiers.models import get_model


def test_encoding_is_safetensors_byte_for_byte_and_round_trips_every_tensor():
    state = get_model("cnn5").state_dict()  # float32 weights and 0-d int64 BatchNorm counters
    data = encode_state(state)
    assert data == save(state)
    back = decode_state(data)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].shape == state[k].shape for k in state)


def test_undecodable_bytes_raise_a_named_error_and_the_digest_sees_any_change():
    with pytest.raises(GeflError, match="cannot decode tensors"):
        decode_arrays(b"\x07" * 100)
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((), np.int64)}
    digest = arrays_digest(arrays)
    assert arrays_digest({k: v.copy() for k, v in arrays.items()}) == digest
    assert arrays_digest({**arrays, "a": arrays["a"].reshape(3, 2)}) != digest
    assert arrays_digest({**arrays, "b": np.ones((), np.int64)}) != digest


def test_chunks_cover_the_payload_in_order():
    data = bytes(range(256)) * 10
    assert b"".join(chunks(data, 1000)) == data
    assert [len(c) for c in chunks(data, 1000)] == [1000, 1000, 560]
    assert [bytes(c) for c in chunks(b"")] == [b""]


def test_the_wire_and_the_client_transport_import_no_torch():
    code = ("import sys, gefl.protocol.wire, gefl.protocol, gefl.edge_client.grpc_transport, "
            "gefl.aggregator.coordinator, gefl.aggregator.grpc_server; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(8.0, 0.5 * 2**n) for n in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)  # jittered: no two clients retry in lockstep
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_encoding_is_byte_for_byte_deterministic():
    import numpy as np

    from gefl.protocol.wire import decode_arrays, encode_arrays

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.int64(7), "c": np.zeros(3, np.uint8)}
    metadata = {k: str(i) for i, k in enumerate("qwertyuiop")}
    encoded = {encode_arrays(arrays, metadata) for _ in range(10)}
    assert len(encoded) == 1
    decoded = decode_arrays(encoded.pop())
    assert set(decoded) == set(arrays) and all(np.array_equal(decoded[k], arrays[k]) for k in arrays)
