"""Regenerate the gRPC stubs in protos/ from protos/gefl_v1.proto.

The folder installs as the package `gefl.protos`, so protoc sees it under that virtual path
(-Igefl/protos=protos) and the stubs import each other as `gefl.protos...`.

    python scripts/gen_protos.py            # rewrite the committed stubs
    python scripts/gen_protos.py --out DIR  # write them elsewhere (the staleness test compares)

grpcio-tools is pinned in the dev extra: another version writes different (version-stamped) stubs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "gefl/protos/gefl_v1.proto"
"""The contract as protoc sees it: protos/ mapped onto its installed package path."""


def generate(out: Path) -> list[Path]:
    (out / "protos").mkdir(parents=True, exist_ok=True)
    staging = out / "protos" / ".protoc"
    staging.mkdir(exist_ok=True)
    try:
        return _generate(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _generate(out: Path, staging: Path) -> list[Path]:
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc", f"-Igefl/protos={ROOT / 'protos'}", f"-I{include}",
        f"--python_out={staging}", f"--pyi_out={staging}", f"--grpc_python_out={staging}", PROTO,
    ])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    written = []
    for path in sorted((staging / "gefl" / "protos").glob("gefl_v1_pb2*")):
        written.append(out / "protos" / path.name)
        written[-1].write_bytes(path.read_bytes())
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
