"""The fused decode attention (kernels/triton_decode.py) against the torch path it replaces: Q/K norm + RoPE
(kernels/fused.py's reference), the K/V store and the torch backend's attention over the same pages. On CPU
tensors under TRITON_INTERPRET=1 (tests/conftest.py); bench/kernel_check.py --decode repeats it on the GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrpc.engine.kv_cache import KVPool
from llmrpc.engine.layers.rotary import RotaryEmbedding
from llmrpc.kernels import fused, triton_decode
from llmrpc.kernels.base import AttentionMetadata
from llmrpc.kernels.torch_backend import TorchAttentionBackend

pytest.importorskip("triton")


def _metadata(kv_lens: list[int], page_size: int, num_pages: int, g: torch.Generator) -> AttentionMetadata:
    """Decode rows whose KV after the step is kv_lens[r] tokens on pages drawn at random from the pool."""
    counts = [-(-n // page_size) for n in kv_lens]
    pages = torch.randperm(num_pages, generator=g)[: sum(counts)].to(torch.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * page_size for n, c in zip(kv_lens, counts)], dtype=np.int32)
    # Each row's new token is its last: the slot after the others on its last page.
    out_loc = torch.tensor([int(pages[indptr[r + 1] - 1]) * page_size + int(last[r]) - 1 for r in range(len(kv_lens))])
    rows = len(kv_lens)
    return AttentionMetadata(page_size=page_size, num_decode=rows, qo_lens=np.ones(rows, np.int32),
                             kv_lens=np.array(kv_lens, np.int32), qo_indptr=np.arange(rows + 1, dtype=np.int32),
                             kv_indptr=indptr, kv_last_page_len=last, kv_indices=pages, out_loc=out_loc,
                             positions=torch.tensor(kv_lens) - 1)


def _qkv(rows: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, g: torch.Generator):
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q = qkv[:, : heads * dim].view(rows, heads, dim)
    k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim)
    return q, k, v


CASES = [  # kv_lens, heads, kv_heads, head_dim, page_size, norm, splits
    ([1], 2, 1, 64, 16, True, 1),  # nothing cached: the new token alone
    ([40], 16, 8, 128, 16, True, 4),  # Qwen3-0.6B's heads, splits that own no tokens
    ([300, 7], 8, 2, 64, 1, True, 5),  # 1-token pages, a group of 4, rows of unequal length
    ([65, 129, 2], 4, 4, 64, 16, False, 3),  # no GQA, no norm (Llama)
    ([33], 6, 2, 64, 8, True, 1),  # a group of 3: padded to 4 in the tile
    ([70], 6, 2, 64, 8, True, 3),  # ... and merged over splits
    ([1, 50], 4, 2, 64, 16, True, 4),  # a row with nothing cached beside one split four ways (a padded graph row)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_lens", "heads", "kv_heads", "dim", "page_size", "norm", "splits"), CASES)
def test_decode_attention_matches_the_torch_path(dtype, kv_lens, heads, kv_heads, dim, page_size, norm,
                                                 splits) -> None:
    g = torch.Generator().manual_seed(sum(kv_lens) + heads + splits)
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 3
    pool = KVPool(1, num_pages, page_size, kv_heads, dim, 4, 512, dtype, "cpu")
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=g).to(dtype))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=g).to(dtype))
    m = _metadata(kv_lens, page_size, num_pages, g)
    q, k, v = _qkv(len(kv_lens), heads, kv_heads, dim, dtype, g)
    cos_sin = RotaryEmbedding(dim, 512, 10000.0).cos_sin
    weights = [(torch.rand(dim, generator=g) + 0.5).to(dtype) for _ in range(2)] if norm else [None, None]
    scale = dim ** -0.5

    want_pool = KVPool(1, num_pages, page_size, kv_heads, dim, 4, 512, dtype, "cpu")
    want_pool.k[0].copy_(pool.k[0])
    want_pool.v[0].copy_(pool.v[0])
    reference = TorchAttentionBackend(want_pool, scale)
    reference.plan(m)
    rq, rk = fused.qk_norm_rope_torch(q.clone(), k.clone(), m.positions, cos_sin, *weights, eps=1e-6)
    want = reference.forward(rq, rk, v, 0)

    workspace = triton_decode.Workspace(4, kv_heads, heads // kv_heads, dim, torch.device("cpu"))
    got = triton_decode.decode_attention(
        q, k, v, pool.k[0], pool.v[0], torch.from_numpy(m.kv_indptr), m.kv_indices,
        torch.from_numpy(m.kv_last_page_len), m.out_loc, m.positions, cos_sin, *weights, 1e-6, scale, workspace,
        splits)
    # The new K/V landed where the reference put them, and nothing else moved (bf16: the interpreter rounds
    # toward zero where torch rounds to nearest, one unit at each rounding point).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pool.k[0], want_pool.k[0], **tol)
    assert torch.equal(pool.v[0], want_pool.v[0])
    torch.testing.assert_close(got, want, **tol)
    assert torch.count_nonzero(workspace.counters) == 0  # left at zero for the next launch


def test_decode_attention_twice_reuses_the_counters() -> None:
    """A second launch over the same workspace (the next layer, the next graph replay) merges again."""
    g = torch.Generator().manual_seed(3)
    pool = KVPool(1, 8, 4, 2, 64, 2, 64, torch.float32, "cpu")
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=g))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=g))
    m = _metadata([21], 4, 8, g)
    q, k, v = _qkv(1, 4, 2, 64, torch.float32, g)
    cos_sin = RotaryEmbedding(64, 64, 10000.0).cos_sin
    workspace = triton_decode.Workspace(1, 2, 2, 64, torch.device("cpu"))
    args = (pool.k[0], pool.v[0], torch.from_numpy(m.kv_indptr), m.kv_indices, torch.from_numpy(m.kv_last_page_len),
            m.out_loc, m.positions, cos_sin, None, None, 1e-6, 0.125, workspace, 3)
    first = triton_decode.decode_attention(q, k, v, *args)
    second = triton_decode.decode_attention(q, k, v, *args)
    assert torch.equal(first, second)


def test_decode_attention_refuses_what_it_cannot_run() -> None:
    workspace = triton_decode.Workspace(1, 2, 2, 64, torch.device("cpu"))
    cache = torch.zeros(4, 4, 2, 64)
    q = torch.zeros(2, 4, 64)
    k = torch.zeros(2, 2, 64)
    i32 = torch.zeros(3, dtype=torch.int32)
    args = (cache, cache, i32, i32, i32, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            torch.zeros(8, 64), None, None, 1e-6, 0.125, workspace, 2)
    with pytest.raises(ValueError, match="the workspace holds 1 rows"):
        triton_decode.decode_attention(q, k, k, *args)
    with pytest.raises(ValueError, match="heads packed"):
        triton_decode.decode_attention(q[:, :, :32], k, k, *args)
    with pytest.raises(ValueError, match="does not hold"):
        triton_decode.decode_attention(q, k, k, cache.to(torch.bfloat16), *args[1:])
