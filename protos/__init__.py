"""The versioned gRPC contract (gefl_v1.proto) and its generated stubs (scripts/gen_protos.py)."""
