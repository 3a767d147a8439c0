"""Paged attention in plain PyTorch: K/V stored into the pages (kernels/fused.py), SDPA over gathered pages.

Used on the CPU and anywhere no faster backend is installed. `plan()` turns the
page lists into token-level gather indices once per step; each layer then gathers
its rows' K/V from the pages. Decode rows (one query each) run as one padded SDPA
call; each prefill chunk runs its own call with a mask that is causal within the
chunk and open over the cached prefix. Pages stored in float8 (--kv-cache-dtype
fp8_e4m3) are upcast to q's dtype after the gather, so only the rows read are converted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from llmrpc.kernels import fused
from llmrpc.kernels.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from llmrpc.engine.kv_cache import KVPool


def _gather(flat: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """flat[index] as `dtype`; float8 pages are gathered as bytes (not every torch build indexes float8 on CUDA)."""
    if fused.fp8_max(flat.dtype) is not None:
        return flat.view(torch.uint8)[index].view(flat.dtype).to(dtype)
    return flat[index].to(dtype)


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, scale: float, num_qo_heads: int | None = None) -> None:
        # num_qo_heads is part of every backend's constructor; SDPA reads it off q instead.
        self.kv_pool = kv_pool
        self.scale = scale
        self._meta: AttentionMetadata | None = None
        self._decode_index: torch.Tensor | None = None  # [D, max_kv] token slots in the flat cache
        self._decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_kv] which of them are real
        self._prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (q0, q1, kv slots, mask)

    def plan(self, metadata: AttentionMetadata) -> None:
        m = metadata
        ps = m.page_size
        device = m.kv_indices.device
        # Every page of every row, expanded to its token slots, row after row.
        token_slots = (m.kv_indices.long().unsqueeze(1) * ps + torch.arange(ps, device=device)).view(-1)
        first = m.kv_indptr[:-1].astype(np.int64) * ps  # each row's first entry in token_slots
        self._meta = m
        nd = m.num_decode
        if nd:
            lens = m.kv_lens[:nd].astype(np.int64)
            cols = np.arange(int(lens.max()))
            real = cols[None, :] < lens[:, None]
            index = np.where(real, first[:nd, None] + cols[None, :], 0)
            self._decode_index = token_slots[torch.from_numpy(index).to(device)]
            self._decode_mask = torch.from_numpy(real).to(device)[:, None, None, :]
        self._prefill = []
        for r in range(nd, m.num_rows):
            q0, q1 = int(m.qo_indptr[r]), int(m.qo_indptr[r + 1])
            kv_len = int(m.kv_lens[r])
            prefix = kv_len - (q1 - q0)
            kv = token_slots[int(first[r]): int(first[r]) + kv_len]
            # Query i sits at position prefix + i and sees keys 0..prefix + i.
            mask = torch.arange(kv_len, device=device)[None, :] <= (prefix + torch.arange(q1 - q0, device=device))[:, None]
            self._prefill.append((q0, q1, kv, mask))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        m = self._meta
        assert m is not None, "plan() comes first"
        k_cache, v_cache = self.kv_pool.k[layer_id], self.kv_pool.v[layer_id]
        fused.store_kv(k_cache, v_cache, m.out_loc, k, v)
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        out = torch.empty_like(q)
        nd = m.num_decode
        if nd:
            assert self._decode_index is not None  # planned with nd decode rows
            # [D, heads, 1 query, head_dim] against [D, kv_heads, max_kv, head_dim], padding masked out.
            keys = _gather(k_flat, self._decode_index, q.dtype).transpose(1, 2)
            values = _gather(v_flat, self._decode_index, q.dtype).transpose(1, 2)
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=self._decode_mask, scale=self.scale, enable_gqa=True
            ).squeeze(2)
        for q0, q1, kv, mask in self._prefill:
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1).unsqueeze(0),
                _gather(k_flat, kv, q.dtype).transpose(0, 1).unsqueeze(0),
                _gather(v_flat, kv, q.dtype).transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=self.scale, enable_gqa=True,
            )
            out[q0:q1] = o[0].transpose(0, 1)
        return out
