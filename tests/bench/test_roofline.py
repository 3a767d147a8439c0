"""bench/roofline.py: parameter counts of shipped shapes, and what a MoE decode step really reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmrpc.bench.roofline import BYTES_PER_PARAM, latency_ceiling, model_shape, workload_ceiling
from llmrpc.bench.workload import offline_workload
from llmrpc.engine.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
H200 = (4284e9, 775e12)  # bandwidth and matmul rate measured on the H200 in GPU run 2


@pytest.mark.parametrize("name,total_b,active_b", [("qwen3-30b-a3b", 30.53, 3.35), ("mistral-7b", 7.25, 7.25),
                                                   ("qwen3-8b", 8.19, 8.19)])
def test_parameter_counts_match_the_published_sizes(name: str, total_b: float, active_b: float) -> None:
    s = model_shape(ModelConfig.load(CONFIGS / name))
    embeddings = s.embed_params + s.lm_head_params
    total = s.dense_params + s.num_sparse_layers * s.num_experts * s.expert_params + embeddings
    assert round(total / 1e9, 2) == total_b  # Qwen3-30B-A3B: 30.5B in all ...
    assert round((s.matmul_params + embeddings) / 1e9, 2) == active_b  # ... 3.3B activated per token


def test_a_moe_decode_step_reads_the_experts_its_rows_route_to() -> None:
    s = model_shape(ModelConfig.load(CONFIGS / "qwen3-30b-a3b"))
    assert (s.num_sparse_layers, s.num_experts, s.experts_per_token, s.expert_params) == (48, 128, 8, 3 * 2048 * 768)
    assert s.experts_read(1) == 8
    assert s.experts_read(64) == pytest.approx(128 * (1 - (120 / 128) ** 64))  # about 126 of 128
    assert s.experts_read(256) == pytest.approx(128, abs=1e-4)
    head = s.lm_head_params
    assert s.weight_bytes(1) == (s.dense_params + 48 * 8 * s.expert_params + head) * BYTES_PER_PARAM
    assert s.weight_bytes(1) / 1e9 == pytest.approx(6.08, abs=0.01)
    assert s.weight_bytes(256) / 1e9 == pytest.approx(60.44, abs=0.01)  # every expert, as a dense model reads
    dense = model_shape(ModelConfig.load(CONFIGS / "qwen3-8b"))
    assert dense.weight_bytes(1) == dense.weight_bytes(256)


def test_ceilings() -> None:
    w = offline_workload()
    prompts = [len(p) for p in w.prompts]
    # The dense figure is the one bench/results/README.md reports for these rates.
    assert round(workload_ceiling(ModelConfig.load(CONFIGS / "qwen3-0.6b"), prompts, w.max_tokens, *H200)
                 ["output_tokens_per_s"]) == 36251
    moe = ModelConfig.load(CONFIGS / "qwen3-30b-a3b")
    offline = workload_ceiling(moe, prompts, w.max_tokens, *H200)
    assert 7000 < offline["output_tokens_per_s"] < 8500
    latency = latency_ceiling(moe, *H200)
    # One stream reads 8 experts a layer (about 6.1 GB a token): about 700 tok/s at 4.3 TB/s.
    assert 650 < latency["decode_tok_s"] < 720
    # 2,048 prompt tokens: their FLOPs (layers, causal attention, one LM-head row) outweigh reading all 61 GB once.
    shape = model_shape(moe)
    flops = 2 * shape.matmul_params * 2048 + 2 * 48 * 4096 * 2048 * 2049 + 2 * shape.lm_head_params
    assert flops / H200[1] > shape.weight_bytes(2048) / H200[0]
    assert latency["ttft_ms"] == pytest.approx(1e3 * flops / H200[1])
