"""The Triton kernels against their torch references, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py).

The interpreter rounds float32 -> bfloat16 toward zero where a GPU rounds to nearest,
so bf16 results may differ from torch's by one unit in the last place at each rounding
point; float32 cases check the arithmetic tightly. bench/kernel_check.py repeats these
checks on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from llmrpc.engine.layers.rotary import RotaryEmbedding
from llmrpc.kernels import fused, triton_fused
from llmrpc.kernels.sampling import race_sample_torch, race_sample_triton

pytest.importorskip("triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _qkv(tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, g: torch.Generator):
    """The fused QKV output and its q, k, v views, as LlamaAttention splits it."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    return qkv, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "dim", "norm"),
                         [(1, 4, 2, 64, True), (37, 2, 1, 128, True), (19, 4, 4, 64, False)])
def test_qk_norm_rope_matches_the_reference_in_place(dtype, tokens, heads, kv_heads, dim, norm) -> None:
    g = torch.Generator().manual_seed(tokens * 7 + heads)
    max_pos = 64
    cos_sin = RotaryEmbedding(dim, max_pos, 10000.0).cos_sin  # the model's own cache layout
    positions = torch.randint(0, max_pos, (tokens,), generator=g)
    positions[0] = max_pos - 1
    qkv, q, k, v = _qkv(tokens, heads, kv_heads, dim, dtype, g)
    weights = [(torch.rand(dim, generator=g) + 0.5).to(dtype) for _ in range(2)] if norm else [None, None]
    want_q, want_k = fused.qk_norm_rope_torch(q.clone(), k.clone(), positions, cos_sin, *weights, eps=1e-6)
    v_before = v.clone()
    triton_fused.qk_norm_rope(q, k, positions, cos_sin, *weights, eps=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert rel_err(q, want_q) < tol and rel_err(k, want_k) < tol
    assert torch.equal(v, v_before)  # the rest of each QKV row is untouched
    if dtype == torch.float32:
        torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)


def test_qk_norm_rope_refuses_heads_that_are_not_packed() -> None:
    q = torch.zeros(3, 2, 128)[:, :, :64]
    cos_sin = RotaryEmbedding(64, 8, 10000.0).cos_sin
    with pytest.raises(ValueError, match="heads packed"):
        triton_fused.qk_norm_rope(q, q, torch.zeros(3, dtype=torch.long), cos_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "kv_heads", "dim"), [(1, 2, 64), (45, 1, 128), (9, 8, 128)])
def test_store_kv_writes_exactly_the_reference_slots(dtype, tokens, kv_heads, dim) -> None:
    g = torch.Generator().manual_seed(tokens + kv_heads)
    pages, page_size = 8, 8
    _qkv_out, _q, k, v = _qkv(tokens, 2 * kv_heads, kv_heads, dim, dtype, g)
    loc = torch.randperm(pages * page_size, generator=g)[:tokens]
    caches = [torch.randn(pages, page_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    fused.store_kv_torch(*want, loc, k, v)
    triton_fused.store_kv(*caches, loc, k, v)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


def test_store_kv_of_no_tokens_is_a_no_op() -> None:
    cache = torch.randn(2, 4, 1, 64)
    before = cache.clone()
    empty = torch.zeros(0, 1, 64)
    triton_fused.store_kv(cache, cache, torch.zeros(0, dtype=torch.long), empty, empty)
    assert torch.equal(cache, before)


def test_race_kernel_draws_the_reference_tokens() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9000, generator=g) * 3  # two vocabulary segments, the second partial
    inv_t = torch.tensor([1.0, 2.0, 0.5, 1 / 0.6])
    keys = torch.tensor([1, 2**40 + 7, 2**62 + 3, 12345], dtype=torch.int64)
    assert torch.equal(race_sample_triton(logits, inv_t, keys), race_sample_torch(logits, inv_t, keys))


def test_the_dispatching_op_and_the_cpu_rope_compute_the_reference() -> None:
    from llmrpc.engine.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(3)
    rotary = RotaryEmbedding(64, 32, 10000.0)
    positions = torch.randint(0, 32, (11,), generator=g)
    q_norm, k_norm = RMSNorm(64, 1e-5), RMSNorm(64, 1e-5)
    q_norm.weight.data.uniform_(0.5, 1.5, generator=g)
    k_norm.weight.data.uniform_(0.5, 1.5, generator=g)
    _qkv_out, q, k, _v = _qkv(11, 4, 2, 64, torch.float32, g)
    want_q, want_k = fused.qk_norm_rope_torch(q, k, positions, rotary.cos_sin, q_norm.weight, k_norm.weight, 1e-5)
    # The model's CPU path: norms, then the cos/sin gathered once per pass.
    got_q, got_k = rotary.for_positions(positions, torch.float32)(q, k, q_norm, k_norm)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    # The CUDA path's op, its Triton kernel forced onto these CPU tensors.
    fused.qk_norm_rope_(q, k, positions, rotary.cos_sin, q_norm.weight, k_norm.weight, 1e-5, kernel="triton")
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
