"""Generates the Python gRPC stubs for protos/ (used by `make protos` and the staleness test)."""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ("llmrpc/v1/generation.proto", "llmrpc/v1/worker.proto")


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir."""
    from grpc_tools import protoc  # only needed at build time

    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            proto,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def main() -> None:
    generate(PROTO_ROOT)
    print(f"generated stubs under {PROTO_ROOT / 'llmrpc/v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
