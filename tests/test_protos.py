"""The committed stubs under protos/ must equal a fresh generation."""
from __future__ import annotations

from pathlib import Path

from llmrpc.services.protogen import PROTO_ROOT, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc generated nothing"
    for rel in fresh:
        committed = PROTO_ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make protos`"
