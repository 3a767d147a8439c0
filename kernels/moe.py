"""Mixture-of-experts kernels: routing, and the experts' gated MLPs over the tokens routed to them.

`select_experts` is the router's softmax top-k (torch.topk, so ties fall exactly
as in transformers). `fused_moe` runs the experts: token t goes through expert
topk_ids[t, j] with weight topk_weights[t, j], and the K results are summed.

The torch version (the reference: the CPU path) loops over the experts that
received tokens, like transformers does. The Triton version (CUDA tensors, when
Triton imports) is the sort-and-grouped-GEMM design of vLLM and SGLang:

1. align: the T*K (token, expert) pairs are sorted by expert and each expert's
   run is padded to a multiple of BLOCK_M, so every block of BLOCK_M sorted rows
   belongs to one expert (`MoEAlignment`);
2. gate_up: per block, rows of x times that expert's [gate | up] weights, with
   silu(gate) * up applied to the two float32 accumulators before one store;
3. down: the activations times the expert's down weights, scaled by the
   router weight; the K rows of each token are then summed.

Nothing in it reads a tensor on the host and every shape depends only on T, so
a decode step with MoE layers captures into a CUDA graph (the blocks past the
padded total exit at once). Within one expert the order of the rows is free:
each output row depends only on its own input row, so results are deterministic
even though the single-program align kernel orders rows by atomics.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrpc.kernels import triton_fused

# ---- routing --------------------------------------------------------------------------------


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weights [T, top_k], int64 expert ids [T, top_k]) from router logits [T, E].

    As transformers' Qwen3-MoE router: softmax in float32, torch.topk (its order, its ties),
    optionally rescaled so each token's chosen weights sum to 1.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# ---- torch reference ------------------------------------------------------------------------


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_j weight[t, j] * expert_{id[t, j]}(x[t]) for x [T, H], w13 [E, 2I, H] ([gate | up]), w2 [E, H, I].

    Experts in increasing id order, each over the rows routed to it (a host sync per
    layer: the CPU path, never captured in a CUDA graph).
    """
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        rows, slots = torch.where(topk_ids == expert)
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, rows, (y * topk_weights[rows, slots, None].to(y.dtype)).to(out.dtype))
    return out


@dataclass(frozen=True)
class MoEAlignment:
    """The (token, expert) pairs sorted by expert, each expert's run padded to a multiple of block_m.

    sorted_ids[i] is pair index t * K + j (num_pairs where padding); block b of block_m rows belongs
    to expert expert_ids[b]; blocks from num_padded[0] on are unused. Sizes depend only on T.
    """

    sorted_ids: torch.Tensor  # int32 [max_padded]
    expert_ids: torch.Tensor  # int32 [max_padded / block_m]
    num_padded: torch.Tensor  # int32 [1]
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows after padding, at most: at most min(E, pairs) experts are hit, each wasting < block_m rows."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The alignment in plain torch ops without host syncs (stable order within an expert)."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert_of]
    max_padded = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_ends[expert_of] - padded[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return MoEAlignment(sorted_ids, expert_ids.to(torch.int32), padded_ends[-1:].to(torch.int32), block_m)


# ---- dispatching op -------------------------------------------------------------------------


@functools.cache
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' outputs [T, H], summed over each token's top-k: Triton on CUDA where it imports."""
    if x.is_cuda and x.shape[0] > 0 and triton_fused.available():
        from llmrpc.kernels.moe_triton import fused_moe_triton

        return fused_moe_triton(x.contiguous(), w13, w2, topk_weights, topk_ids)
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids)
