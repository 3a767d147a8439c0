"""The attention-backend interface and the per-step metadata every backend plans from.

A step's rows are decode rows first (one new token each) then prefill chunks. Each
row r has `qo_lens[r]` new tokens and, after this step, `kv_lens[r]` tokens of KV
held in the pages `kv_indices[kv_indptr[r]:kv_indptr[r+1]]` (the last one filled to
`kv_last_page_len[r]`). That is FlashInfer's paged-KV layout (NHD pages of
[page_size, kv_heads, head_dim]), so a FlashInfer backend hands these arrays to
its wrappers' `plan()` once per step, and each layer's `forward()` is their `run()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from llmrpc.engine.layers.norm import RMSNorm
    from llmrpc.engine.layers.rotary import Rope
    from llmrpc.kernels.triton_decode import FusedDecode


@dataclass
class AttentionMetadata:
    """Where each row's queries and KV live. Host arrays are int32 numpy; tensors are on the device."""

    page_size: int
    num_decode: int
    qo_lens: np.ndarray  # [B] new tokens per row
    kv_lens: np.ndarray  # [B] KV tokens per row after this step (cached prefix + new)
    qo_indptr: np.ndarray  # [B+1] row r's tokens are [qo_indptr[r], qo_indptr[r+1]) of the flat batch
    kv_indptr: np.ndarray  # [B+1] row r's pages are kv_indices[kv_indptr[r]:kv_indptr[r+1]]
    kv_last_page_len: np.ndarray  # [B] tokens used in each row's last page
    kv_indices: torch.Tensor  # int32 [kv_indptr[-1]] page ids, row after row
    out_loc: torch.Tensor  # int64 [T] where each new token's K/V goes: page * page_size + offset
    positions: torch.Tensor  # int64 [T] position of each new token in its sequence

    @property
    def num_rows(self) -> int:
        return len(self.qo_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and attends over each row's pages.

    `plan()` runs once per step (host-side work, index building); `forward()` runs
    once per layer with q [T, qo_heads, head_dim] and k, v [T, kv_heads, head_dim]
    and returns the attention output [T, qo_heads, head_dim]. Attention is causal
    within a row's new tokens and sees the row's whole cached prefix. The model calls
    `rope_forward()`, which rotates q and k first, or hands all of it to the fused
    decode kernel when the step's plan chose that.
    """

    # Set by the plan of a step whose attention runs as one fused kernel a layer (kernels/triton_decode.py).
    fused_decode: FusedDecode | None = None

    @abstractmethod
    def plan(self, metadata: AttentionMetadata) -> None: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor: ...

    def rope_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, rope: Rope,
                     q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> torch.Tensor:
        """forward() of q and k rotated by `rope`, each head RMS-normalized first where norms are given
        (Qwen3): as the rotation, the store and the attention apart, or as the planned fused decode."""
        if self.fused_decode is not None:
            return self.fused_decode(q, k, v, layer_id, rope, q_norm, k_norm)
        q, k = rope(q, k, q_norm, k_norm)
        return self.forward(q, k, v, layer_id)
