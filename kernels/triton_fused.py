"""Triton kernels of the attention block's per-token work: Q/K RMSNorm + RoPE in place, and the K/V store.

Both read q, k and v where the QKV projection left them: views into its fused
output [T, q_size + 2 * kv_size], so no copy makes them contiguous first.

`qk_norm_rope` normalizes every head of q and k (Qwen3's q_norm / k_norm, in
float32 with the reference's rounding points: the normalized value is rounded to
the model dtype before the weight multiplies it, as in HF and kernels/fused.py
`rms_norm_torch`), then rotates it by its position's angle (half-split "neox"
layout, cos and sin read from the float32 cache in float32), and writes it back
in place: one launch for both tensors instead of two norms, a RoPE and the
copies that fed them. Without weights it is RoPE alone.

`store_kv` writes each new token's K and V into its slot of the paged cache
(`out_loc`: page * page_size + offset) in one launch for both tensors, cast to the
cache's dtype; into a float8 cache (--kv-cache-dtype fp8_e4m3) it saturates first.

Triton is imported on first use (a CPU deployment never needs it). Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors; the tests use that to
check them against the torch references.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

# Tokens per program. 16 tokens x half a head of 128 is 1,024 elements per tile: 16-byte loads per thread.
NORM_ROPE_BLOCK_T = 16
STORE_BLOCK_T = 4


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # The token count changes every step; specializing on it would compile a kernel per divisibility class.
    @triton.jit(do_not_specialize=["num_tokens"])
    def qk_norm_rope_kernel(q_ptr, k_ptr, q_row_stride, k_row_stride, q_weight_ptr, k_weight_ptr,
                            positions_ptr, cos_sin_ptr, cos_sin_stride, num_tokens, eps,
                            NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NORM: tl.constexpr,
                            BLOCK_T: tl.constexpr):
        # Program (token block, head): heads [0, NUM_Q_HEADS) are q's, the rest k's.
        HALF: tl.constexpr = HEAD_DIM // 2
        head = tl.program_id(1)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = tokens < num_tokens
        cols = tl.arange(0, HALF)
        if head < NUM_Q_HEADS:
            base = q_ptr + tokens[:, None].to(tl.int64) * q_row_stride + head * HEAD_DIM
            weight_ptr = q_weight_ptr
        else:
            base = k_ptr + tokens[:, None].to(tl.int64) * k_row_stride + (head - NUM_Q_HEADS) * HEAD_DIM
            weight_ptr = k_weight_ptr
        mask = rows[:, None]
        x1 = tl.load(base + cols[None, :], mask=mask, other=0.0)
        x2 = tl.load(base + HALF + cols[None, :], mask=mask, other=0.0)
        dtype = q_ptr.dtype.element_ty  # q's and k's
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        if NORM:
            mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
            inv_rms = tl.rsqrt(mean_square + eps)[:, None]
            w1 = tl.load(weight_ptr + cols).to(tl.float32)[None, :]
            w2 = tl.load(weight_ptr + HALF + cols).to(tl.float32)[None, :]
            # Rounded where the reference rounds: the normalized value, then its product with the weight.
            x1 = ((x1 * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            x2 = ((x2 * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        pos = tl.load(positions_ptr + tokens, mask=rows, other=0).to(tl.int64)
        angle = cos_sin_ptr + pos[:, None] * cos_sin_stride + cols[None, :]
        cos = tl.load(angle, mask=mask, other=1.0)
        sin = tl.load(angle + HALF, mask=mask, other=0.0)
        tl.store(base + cols[None, :], (x1 * cos - x2 * sin).to(dtype), mask=mask)
        tl.store(base + HALF + cols[None, :], (x2 * cos + x1 * sin).to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["num_tokens"])
    def store_kv_kernel(k_ptr, v_ptr, k_row_stride, v_row_stride, k_cache_ptr, v_cache_ptr, loc_ptr, num_tokens,
                        ROW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                        SATURATE: tl.constexpr, LIMIT: tl.constexpr):
        # One token's K (or V) is ROW = kv_heads * head_dim contiguous elements, in the input and in its slot.
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = tokens < num_tokens
        mask = rows[:, None] & (cols[None, :] < ROW)
        slot = tl.load(loc_ptr + tokens, mask=rows, other=0).to(tl.int64)
        src = tokens[:, None].to(tl.int64)
        dst = slot[:, None] * ROW + cols[None, :]
        k = tl.load(k_ptr + src * k_row_stride + cols[None, :], mask=mask)
        v = tl.load(v_ptr + src * v_row_stride + cols[None, :], mask=mask)
        if SATURATE:  # a float8 cache: clamp to its largest finite value, so outliers never become NaN
            k = tl.clamp(k.to(tl.float32), -LIMIT, LIMIT)
            v = tl.clamp(v.to(tl.float32), -LIMIT, LIMIT)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    return triton, qk_norm_rope_kernel, store_kv_kernel


def heads_packed(x: torch.Tensor) -> bool:
    """[T, heads, head_dim] whose heads lie back to back in each row (any row stride)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 block_t: int = NORM_ROPE_BLOCK_T) -> None:
    """In place: q [T, heads, d] and k [T, kv_heads, d] (heads packed in each row, rows any stride), each
    head RMS-normalized by its weight when weights are given, then rotated; cos_sin [max_pos, d] float32."""
    num_tokens, num_q_heads, head_dim = q.shape
    if not (heads_packed(q) and heads_packed(k)) or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: need [T, heads, head_dim] with heads packed")
    if cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32 or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin {tuple(cos_sin.shape)} {cos_sin.dtype}: need [max_pos, {head_dim}] float32")
    if num_tokens == 0:
        return
    triton, kernel, _ = _kernels()
    norm = q_weight is not None
    grid = (triton.cdiv(num_tokens, block_t), num_q_heads + k.shape[1])
    kernel[grid](q, k, q.stride(0), k.stride(0), q_weight if norm else q, k_weight if norm else k,
                 positions, cos_sin, cos_sin.stride(0), num_tokens, eps,
                 NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, NORM=norm, BLOCK_T=block_t)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             block_t: int = STORE_BLOCK_T) -> None:
    """k_cache.view(-1, kv_heads, d)[loc] = k and the same for v, in one launch; caches contiguous, of any
    dtype the values are cast to (a float8 one saturating, as kernels/fused.py `to_kv_dtype`)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k = k if heads_packed(k) else k.contiguous()
    v = v if heads_packed(v) else v.contiguous()
    row = k.shape[1] * k.shape[2]
    triton, _, kernel = _kernels()
    block_c = min(triton.next_power_of_2(row), 1024)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row, block_c))
    from llmrpc.kernels.fused import fp8_max  # here, not at the top: fused imports this module

    limit = fp8_max(k_cache.dtype)
    kernel[grid](k, v, k.stride(0), v.stride(0), k_cache, v_cache, loc, num_tokens,
                 ROW=row, BLOCK_T=block_t, BLOCK_C=block_c, SATURATE=limit is not None, LIMIT=float(limit or 0.0))
