"""Captured decode batch sizes and prefill token counts (the graphs themselves are checked on a GPU by
bench/gpu_check.py)."""
from __future__ import annotations

import pytest

from llmrpc.engine.config import EngineConfig
from llmrpc.engine.cuda_graph import capture_sizes, prefill_capture_sizes


def test_capture_sizes_cover_every_batch_with_little_padding() -> None:
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(3) == [1, 2, 3]
    for max_bs in (1, 3, 40, 256):
        sizes = capture_sizes(max_bs)
        for n in range(1, max_bs + 1):
            padded = next(s for s in sizes if s >= n)
            assert padded - n < 16


def test_cuda_graph_max_bs_is_validated() -> None:
    assert EngineConfig(model_path="m").cuda_graph_max_bs == 256
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        EngineConfig(model_path="m", cuda_graph_max_bs=-1)


def test_prefill_sizes_pad_a_prefill_to_at_most_twice_its_tokens() -> None:
    assert prefill_capture_sizes(4096) == [256, 512, 1024, 2048, 4096]
    assert prefill_capture_sizes(3000) == [256, 512, 1024, 2048, 3000]
    assert prefill_capture_sizes(100) == [100]
    sizes = prefill_capture_sizes(4096)
    for n in range(257, 4097, 7):
        assert next(s for s in sizes if s >= n) < 2 * n
    assert EngineConfig(model_path="m").prefill_graph_max_tokens == 4096
    with pytest.raises(ValueError, match="prefill_graph_max_tokens"):
        EngineConfig(model_path="m", prefill_graph_max_tokens=-1)
