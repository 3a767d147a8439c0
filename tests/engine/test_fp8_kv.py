"""--kv-cache-dtype fp8_e4m3 in the engine: the config refuses unknown values, the pool holds twice bf16's
tokens in the same memory, and greedy generation on the default model runs with the KV invariants checked
and agrees with the float32-KV run on most tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmrpc.engine.config import EngineConfig, ModelConfig
from llmrpc.engine.kv_cache import CPU_KV_BUDGET_BYTES, KVPool, kv_cache_dtype, plan_num_pages
from llmrpc.services.llm import LLM
from llmrpc.v1 import generation_pb2 as pb

QWEN3_0_6B = Path(__file__).parents[2] / "bench" / "configs" / "qwen3-0.6b"
NEW_TOKENS = 24
GREEDY = pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "Write one sentence about rivers.", "def fibonacci(n):",
           "Here is a list of fruits: apple,", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "Translate to French: I like cheese.", "1, 2, 3, 5, 8, 13,"]


def test_the_kv_cache_dtype_is_the_models_or_fp8_and_nothing_else() -> None:
    assert EngineConfig(model_path="m").kv_cache_dtype_name == "float32"
    assert EngineConfig(model_path="m", device="cuda").kv_cache_dtype_name == "bfloat16"
    assert EngineConfig(model_path="m", dtype="float16", device="cuda").kv_cache_dtype_name == "float16"
    fp8 = EngineConfig(model_path="m", kv_cache_dtype="fp8_e4m3")
    assert fp8.kv_cache_dtype_name == "float8_e4m3fn" and kv_cache_dtype(fp8) is torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"kv_cache_dtype \(--kv-cache-dtype\) must be one of auto, fp8_e4m3, "
                                         r"got 'fp8'"):
        EngineConfig(model_path="m", kv_cache_dtype="fp8")


def test_an_fp8_pool_holds_twice_the_tokens_of_bf16_in_the_same_memory() -> None:
    mc = ModelConfig.load(QWEN3_0_6B)  # 28 layers x 8 KV heads x 128: 112 KiB per token in bf16
    pages = {}
    for kv in ("auto", "fp8_e4m3"):
        config = EngineConfig(model_path=str(QWEN3_0_6B), dtype="bfloat16", kv_cache_dtype=kv)
        per_token = KVPool.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                                           kv_cache_dtype(config))
        pages[kv] = plan_num_pages(config, per_token)  # from the CPU's fixed byte budget
        assert pages[kv] * config.page_size * per_token <= CPU_KV_BUDGET_BYTES
    assert (pages["auto"], pages["fp8_e4m3"]) == (585, 1170)
    # A token cap is a token count whatever the dtype.
    capped = [plan_num_pages(EngineConfig(model_path="m", kv_cache_dtype=kv, max_total_tokens=4096), per_token)
              for kv, per_token in (("auto", 2), ("fp8_e4m3", 1))]
    assert capped == [256, 256]
    # What the pool allocates: one byte per element, so twice the pages in bf16's bytes.
    shape = dict(num_layers=2, page_size=16, num_kv_heads=2, head_dim=64, max_slots=2, max_context=64, device="cpu")
    bf16 = KVPool(num_pages=10, dtype=torch.bfloat16, **shape)
    fp8 = KVPool(num_pages=20, dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16, **shape)
    assert sum(t.nbytes for t in bf16.k + bf16.v) == sum(t.nbytes for t in fp8.k + fp8.v)
    assert fp8.capacity_tokens == 2 * bf16.capacity_tokens and fp8.compute_dtype == torch.bfloat16
    assert (bf16.dtype, bf16.compute_dtype) == (torch.bfloat16, torch.bfloat16)


def _generate(model_dir: Path, kv: str) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(model_dir), check_invariants=True, max_total_tokens=4096, kv_cache_dtype=kv)
    outputs = llm.generate(PROMPTS, GREEDY)
    for out in outputs:
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert len(out.outputs[0].token_ids) == NEW_TOKENS
    core = llm.scheduler
    core.check_invariants()
    assert not core.requests and core.num_free_pages + core.num_cached_pages == core.config.num_pages
    return llm, [out.outputs[0].token_ids for out in outputs]


def test_greedy_generation_with_fp8_kv_agrees_with_float32_kv_on_most_tokens(default_model_dir: Path) -> None:
    _, want = _generate(default_model_dir, "auto")
    llm, got = _generate(default_model_dir, "fp8_e4m3")
    info = llm.runner.info
    assert (info.kv_cache_dtype, info.dtype, info.num_pages) == ("float8_e4m3fn", "float32", 256)
    assert llm.runner.kv_pool.k[0].dtype == torch.float8_e4m3fn
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    first_divergence = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), NEW_TOKENS)
                        for w, g in zip(want, got)]
    # Measured on this model (8 prompts x 24 tokens): 139/192 positions (72%) identical, the first
    # divergences at [none, 15, 13, 2, 5, none, none, 10]. e4m3 at scale 1.0 keeps 3 mantissa bits
    # (layer 0's V is within +-0.6, partly subnormal), so near-ties of a 135M model's greedy logits
    # flip; bf16 KV, tried the same way, agreed on every token.
    assert all(w[0] == g[0] for w, g in zip(want, got)), first_divergence
    assert same / (len(PROMPTS) * NEW_TOKENS) >= 0.6, (same, first_divergence)
    assert sorted(first_divergence)[len(PROMPTS) // 2] >= 8, first_divergence
