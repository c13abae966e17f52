"""The versioned gRPC contract (gefl_v1.proto), its generated stubs (scripts/gen_protos.py), and
the channel settings both ends must agree on."""

MAX_MESSAGE = (1 << 20) + (1 << 16)
"""One 1 MiB chunk plus its envelope: nothing larger is ever sent, so nothing larger is accepted."""

KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
"""HTTP/2 pings every 10 s: a connection whose far end vanished (power cut, lost link) is torn down
within 15 s on both sides instead of whenever TCP gives up."""
