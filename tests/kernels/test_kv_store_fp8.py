"""The float8 KV cache (--kv-cache-dtype fp8_e4m3) in the kernels: the store casts with saturation, the
Triton store (under TRITON_INTERPRET=1, tests/conftest.py) writes the torch store's bytes, and the torch
backend attends over float8 pages exactly as over the same values held in float32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrpc.engine.kv_cache import KVPool
from llmrpc.kernels import AttentionMetadata, create_attention_backend, fused, triton_fused

FP8 = torch.float8_e4m3fn


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def test_the_fp8_cast_saturates_at_448_and_rounds_to_nearest() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, 0.1, 17.3, 448.0, 449.0, 500.0, -1000.0, 1e6, -1e6, 1e-4, 0.3])
    got = fused.to_kv_dtype(x, FP8).float()
    # e4m3 keeps 3 mantissa bits: 0.1 -> 0.1015625, 17.3 -> 18 (the step is 2 there), 1e-4 underflows to 0.
    want = [0.0, 1.0, -1.0, 0.1015625, 18.0, 448.0, 448.0, 448.0, -448.0, 448.0, -448.0, 0.0, 0.3125]
    assert got.tolist() == want
    assert fused.fp8_max(FP8) == 448.0 and fused.fp8_max(torch.bfloat16) is None
    assert fused.to_kv_dtype(x, torch.float32) is x  # the model dtype: no copy, no clamp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_store_writes_fp8_slots_and_round_trips_within_e4m3_precision(dtype) -> None:
    g = torch.Generator().manual_seed(1)
    pages, page_size, kv_heads, dim, tokens = 6, 4, 2, 16, 9
    qkv = (torch.randn(tokens, 4 * kv_heads * dim, generator=g) * 4).to(dtype)
    k = qkv[:, : kv_heads * dim].view(tokens, kv_heads, dim)  # strided views, as the QKV split leaves them
    v = qkv[:, 2 * kv_heads * dim: 3 * kv_heads * dim].view(tokens, kv_heads, dim)
    k[0, 0, :3] = torch.tensor([600.0, -900.0, 448.0], dtype=dtype)  # outliers saturate, never NaN
    loc = torch.randperm(pages * page_size, generator=g)[:tokens]
    caches = [torch.zeros(pages, page_size, kv_heads, dim, dtype=FP8) for _ in range(2)]
    fused.store_kv(*caches, loc, k, v)  # on the CPU the dispatching op is the torch store
    for cache, x in zip(caches, (k, v)):
        flat = cache.view(-1, kv_heads, dim)
        assert torch.equal(_bytes(flat[loc]), _bytes(fused.to_kv_dtype(x, FP8)))
        others = torch.ones(pages * page_size, dtype=torch.bool)
        others[loc] = False
        assert not _bytes(flat[others]).any()  # no other slot was touched
        back = flat[loc].float()
        assert not back.isnan().any()
        # A normal e4m3 value is within half a step (2^-4 relative) of what was stored.
        normal = (x.float().abs() >= 2 ** -6) & (x.float().abs() <= 448)
        err = (back - x.float()).abs()[normal] / x.float().abs()[normal]
        assert float(err.max()) <= 2 ** -4
    assert caches[0].view(-1, kv_heads, dim)[loc[0], 0, :3].float().tolist() == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "kv_heads", "dim"), [(1, 2, 64), (45, 1, 128), (9, 8, 128)])
def test_the_triton_store_writes_the_torch_stores_fp8_bytes(dtype, tokens, kv_heads, dim) -> None:
    """Values on the e4m3 grid (every finite one occurs) and outliers beyond 448, which must saturate.

    Only those: the interpreter's own float -> fp8 rounding drops the carry into the exponent (126.8
    becomes 64, not 128), so rounding between grid points is the GPU's cvt, checked against the torch
    store on the GPU by bench/fp8_kv.py."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(tokens + kv_heads)
    pages, page_size = 8, 8
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()]
    picks = grid[torch.randint(0, len(grid), (tokens, 3 * kv_heads * dim), generator=g)]
    picks.view(-1)[: len(grid)] = grid[: picks.numel()]
    outliers = torch.rand(picks.shape, generator=g) < 0.05
    outliers.view(-1)[: len(grid)] = False
    picks[outliers] = torch.randn(picks.shape, generator=g)[outliers].sign() * 1000
    qkv = picks.to(dtype)
    k = qkv[:, : kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, kv_heads * dim: 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    loc = torch.randperm(pages * page_size, generator=g)[:tokens]
    caches = [torch.randn(pages, page_size, kv_heads, dim, generator=g).to(FP8) for _ in range(2)]
    want = [c.clone() for c in caches]
    fused.store_kv_torch(*want, loc, k, v)
    triton_fused.store_kv(*caches, loc, k, v)
    assert torch.equal(_bytes(caches[0]), _bytes(want[0])) and torch.equal(_bytes(caches[1]), _bytes(want[1]))
    assert not caches[0].float().isnan().any() and float(caches[0].float().abs().max()) == 448.0


def test_the_torch_backend_reads_fp8_pages_as_the_values_they_hold() -> None:
    """Decode rows and prefill chunks over a float8 pool give exactly what they give over a float32 pool
    holding the same (fp8-rounded) K/V: the pages are upcast, nothing else changes."""
    heads, kv_heads, dim, layers, page_size = 4, 2, 16, 2, 4
    g = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    rows = [(6, 1), (0, 1), (0, 7), (5, 3)]  # (cached prefix, new tokens): decode rows first
    num_decode = 2
    pools = {dt: KVPool(layers, num_pages=40, page_size=page_size, num_kv_heads=kv_heads, head_dim=dim,
                        max_slots=4, max_context=32, dtype=dt, device="cpu", compute_dtype=torch.float32)
             for dt in (FP8, torch.float32)}
    free = list(rng.permutation(40))
    kv_indices, out_loc, counts, news = [], [], [], []
    for prefix, n in rows:
        row_pages = [int(free.pop()) for _ in range(-(-(prefix + n) // page_size))]
        kv_indices += row_pages
        counts.append(len(row_pages))
        kv = (torch.randn(2, layers, prefix + n, kv_heads, dim, generator=g) * 3).to(FP8).float()
        for pos in range(prefix + n):
            slot = (row_pages[pos // page_size], pos % page_size)
            if pos < prefix:
                for pool in pools.values():
                    for layer in range(layers):
                        pool.k[layer][slot] = kv[0, layer, pos].to(pool.dtype)
                        pool.v[layer][slot] = kv[1, layer, pos].to(pool.dtype)
            else:
                out_loc.append(slot[0] * page_size + slot[1])
        news.append(kv[:, :, prefix:])
    qo_lens = np.array([n for _, n in rows], np.int32)
    kv_lens = np.array([p + n for p, n in rows], np.int32)
    meta = AttentionMetadata(
        page_size=page_size, num_decode=num_decode, qo_lens=qo_lens, kv_lens=kv_lens,
        qo_indptr=np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32),
        kv_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
        kv_last_page_len=(kv_lens - (np.array(counts) - 1) * page_size).astype(np.int32),
        kv_indices=torch.tensor(kv_indices, dtype=torch.int32),
        out_loc=torch.tensor(out_loc, dtype=torch.long),
        positions=torch.tensor([p + i for p, n in rows for i in range(n)], dtype=torch.long))
    backends = {dt: create_attention_backend("torch", "cpu", kv_pool=pool, scale=dim ** -0.5)
                for dt, pool in pools.items()}
    for backend in backends.values():
        backend.plan(meta)
    for layer in range(layers):
        q = torch.randn(int(qo_lens.sum()), heads, dim, generator=g)
        k_new = torch.cat([n[0, layer] for n in news])
        v_new = torch.cat([n[1, layer] for n in news])
        out8 = backends[FP8].forward(q, k_new, v_new, layer)
        out32 = backends[torch.float32].forward(q, k_new, v_new, layer)
        assert out8.dtype == torch.float32 and torch.equal(out8, out32)
