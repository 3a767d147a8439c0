"""The PyTorch paged-attention backend against a naive float64 reference.

Rows mix decode (one new token) and prefill chunks, some continuing a cached
prefix; every row's pages are scattered at random through the pool, and page
sizes include 1 and sizes that do not divide the sequence lengths.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrpc.engine.kv_cache import KVPool
from llmrpc.kernels import AttentionMetadata, attention_backend_names, create_attention_backend
from llmrpc.kernels import resolve_attention_backend

HEADS, KV_HEADS, DIM, LAYERS = 4, 2, 8, 2


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions prefix.., over k, v [prefix + n, KV, D], GQA by repeating KV heads."""
    group = HEADS // KV_HEADS
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    n, total = q.shape[0], k.shape[0]
    visible = torch.arange(total)[None, :] <= prefix + torch.arange(n)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("page_size,seed", [(1, 0), (3, 1), (4, 2), (16, 3)])
def test_matches_naive_attention_over_random_page_layouts(page_size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # (prefix already cached, new tokens): decode rows first, then prefill chunks.
    rows = [(7, 1), (0, 1), (12, 1), (0, 9), (5, 6), (10, 1)]
    num_decode = 3
    pool = KVPool(LAYERS, num_pages=200, page_size=page_size, num_kv_heads=KV_HEADS, head_dim=DIM,
                  max_slots=8, max_context=64, dtype=torch.float32, device="cpu")
    free = list(rng.permutation(pool.num_pages))
    scale = DIM ** -0.5
    full_k, full_v, pages, out_loc, kv_indices = [], [], [], [], []
    for prefix, n in rows:
        total = prefix + n
        row_pages = [int(free.pop()) for _ in range(-(-total // page_size))]
        pages.append(row_pages)
        kv_indices += row_pages
        k = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=g)
        v = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=g)
        full_k.append(k)
        full_v.append(v)
        for pos in range(total):
            page, offset = row_pages[pos // page_size], pos % page_size
            if pos < prefix:  # the cached prefix is already in its pages
                for layer in range(LAYERS):
                    pool.k[layer][page, offset] = k[layer, pos]
                    pool.v[layer][page, offset] = v[layer, pos]
            else:
                out_loc.append(page * page_size + offset)
    qo_lens = np.array([n for _, n in rows], np.int32)
    kv_lens = np.array([p + n for p, n in rows], np.int32)
    counts = np.array([len(p) for p in pages])
    meta = AttentionMetadata(
        page_size=page_size, num_decode=num_decode, qo_lens=qo_lens, kv_lens=kv_lens,
        qo_indptr=np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32),
        kv_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
        kv_last_page_len=(kv_lens - (counts - 1) * page_size).astype(np.int32),
        kv_indices=torch.tensor(kv_indices, dtype=torch.int32),
        out_loc=torch.tensor(out_loc, dtype=torch.long),
        positions=torch.tensor([p + i for p, n in rows for i in range(n)], dtype=torch.long),
    )
    backend = create_attention_backend("torch", "cpu", kv_pool=pool, scale=scale)
    backend.plan(meta)
    for layer in range(LAYERS):
        q = torch.randn(int(qo_lens.sum()), HEADS, DIM, generator=g)
        new_k = torch.cat([k[layer, p:] for k, (p, _) in zip(full_k, rows)])
        new_v = torch.cat([v[layer, p:] for v, (p, _) in zip(full_v, rows)])
        out = backend.forward(q, new_k, new_v, layer)
        start = 0
        for (prefix, n), k, v in zip(rows, full_k, full_v):
            expected = _naive(q[start:start + n], k[layer], v[layer], prefix, scale)
            torch.testing.assert_close(out[start:start + n].double(), expected, atol=1e-5, rtol=1e-5)
            start += n
        # The new K/V were stored where out_loc points.
        flat_k = pool.k[layer].view(-1, KV_HEADS, DIM)
        assert torch.equal(flat_k[meta.out_loc], new_k)
        assert torch.equal(pool.v[layer].view(-1, KV_HEADS, DIM)[meta.out_loc], new_v)


def test_registry_resolves_auto() -> None:
    import importlib.util

    assert resolve_attention_backend("auto", "cpu") == "torch"
    has_flashinfer = importlib.util.find_spec("flashinfer") is not None
    assert resolve_attention_backend("auto", "cuda") == ("flashinfer" if has_flashinfer else "torch")
    assert "torch" in attention_backend_names() and "auto" in attention_backend_names()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_attention_backend("nope", "cpu")
