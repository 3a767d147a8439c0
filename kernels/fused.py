"""Fused elementwise kernels of the model's layers: RMSNorm, add + RMSNorm, SiLU-and-mul, Q/K norm + RoPE,
and the K/V store into the paged cache (cast to the cache's dtype, float8 saturating: `to_kv_dtype`).

Each op has a plain PyTorch version (the reference: the CPU path, and any GPU
without FlashInfer or Triton) and a fused version used for CUDA tensors: FlashInfer's
kernels, or ours in kernels/triton_fused.py where one Triton launch replaces several
(Qwen3's Q/K norm with RoPE; K and V stored together). The linears of a few-row step
(`linear`, `norm_linear`, `silu_mul_linear`) run kernels/triton_gemv.py's GEMV with the
norm or SiLU before them folded in, up to `GEMV_MAX_ROWS` rows. On a GPU the torch versions
cost 5-12 small kernels each; in a CUDA-graphed decode step of a small model those
launches, not the bytes, set the step time, so one kernel per op matters there.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from llmrpc.kernels import triton_fused, triton_gemv


@functools.cache
def flashinfer_module():
    """The flashinfer module, or None where it is not installed (imported on first CUDA use only)."""
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return flashinfer


def _fused(x: torch.Tensor):
    return flashinfer_module() if x.is_cuda else None


# ---- torch references ---------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 like the HF reference, so logits match it exactly in fp32."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its position's angle (half-split "neox" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_cos_sin(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim] at `positions` from the cache [max_pos, head_dim] (cos half, sin half)."""
    cos, sin = cos_sin[positions].to(dtype).chunk(2, dim=-1)
    return torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([sin, sin], -1).unsqueeze(1)


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """What `qk_norm_rope_` computes, out of place: each head's RMSNorm (when weights are given), then RoPE
    in float32."""
    cos, sin = rope_cos_sin(cos_sin, positions, torch.float32)

    def one(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is not None:
            x = rms_norm_torch(x, weight, eps)
        return rope_torch(x.float(), cos, sin).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


def fp8_max(dtype: torch.dtype) -> float | None:
    """The largest finite value of a float8 cache dtype (448 for e4m3), where a store saturates; None otherwise."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        return float(torch.finfo(dtype).max)
    return None


def to_kv_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it. Into float8 with scale 1.0 (no calibrated scales, as SGLang and vLLM by
    default), clamped to the largest finite value first, so an outlier saturates rather than turning NaN."""
    limit = fp8_max(dtype)
    if limit is not None:
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def store_kv_torch(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
    """Token t's K and V go to slot loc[t] of the caches [pages, page_size, kv_heads, head_dim], cast to
    the caches' dtype (`to_kv_dtype`)."""
    for cache, x in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, *x.shape[1:])
        x = to_kv_dtype(x, flat.dtype)
        if fp8_max(flat.dtype) is not None:  # index_copy_ has no float8 kernel (on the CPU at least): copy bytes
            flat.view(torch.uint8).index_copy_(0, loc, x.view(torch.uint8))
        else:
            flat.index_copy_(0, loc, x)


# ---- dispatching ops ------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape)."""
    fi = _fused(x)
    if fi is None:
        return rms_norm_torch(x, weight, eps)
    return fi.rmsnorm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); the FlashInfer path overwrites x and residual in place."""
    fi = _fused(x)
    if fi is None:
        s = x + residual
        return rms_norm_torch(s, weight, eps), s
    fi.fused_add_rmsnorm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    fi = _fused(x)
    return silu_and_mul_torch(x) if fi is None else fi.silu_and_mul(x)


def rope_inplace_supported(x: torch.Tensor) -> bool:
    """Whether `qk_norm_rope_` has a fused kernel for tensors on x's device."""
    return x.is_cuda and (triton_fused.available() or flashinfer_module() is not None)


# Which kernel rotates q and k when there is no norm to fuse: FlashInfer's until bench/kernel_check.py
# measures the Triton one faster (with the norm, Triton's one launch replaces FlashInfer's three).
PLAIN_ROPE_KERNEL = "flashinfer"


def qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                  q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, kernel: str = "auto") -> None:
    """In place on q [T, heads, d] and k [T, kv_heads, d], which may be views into the QKV output: each
    head RMS-normalized (when weights are given), then rotated; cos_sin [max_pos, d] float32. CUDA only
    (`rope_inplace_supported`); `kernel` "triton" or "flashinfer" forces one (bench/kernel_check.py).
    """
    fi = flashinfer_module()
    if kernel == "auto":
        triton_first = q_weight is not None or PLAIN_ROPE_KERNEL == "triton" or fi is None
        kernel = "triton" if triton_first and triton_fused.available() else "flashinfer"
    if kernel == "triton":
        triton_fused.qk_norm_rope(q, k, positions, cos_sin, q_weight, k_weight, eps)
        return
    if q_weight is not None:
        fi.rmsnorm(q, q_weight, eps, out=q)  # 3-D input: FlashInfer's per-head kernel, strided rows
        fi.rmsnorm(k, k_weight, eps, out=k)
    fi.apply_rope_with_cos_sin_cache_inplace(positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1),
                                             q.shape[-1], cos_sin, is_neox=True)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, kernel: str = "auto") -> None:
    """New K/V [T, kv_heads, d] into their cache slots `loc` (page * page_size + offset), cast to the
    caches' dtype (float8 saturating, `to_kv_dtype`): on CUDA one Triton launch for both (index_copy_
    takes one per tensor); `kernel` "torch" forces index_copy_."""
    if kernel == "triton" or (kernel == "auto" and k.is_cuda and triton_fused.available()):
        triton_fused.store_kv(k_cache, v_cache, loc, k, v)
    else:
        store_kv_torch(k_cache, v_cache, loc, k, v)


# ---- linears: cuBLAS, or at a few rows the GEMV with the op before it folded in --------------------------

# Rows up to which a CUDA linear runs the Triton GEMV (kernels/triton_gemv.py) instead of cuBLAS; 0: never.
# The runner sets it from EngineConfig.gemv_max_rows once, before it builds the model's CUDA graphs.
GEMV_MAX_ROWS = 0
# ... and weights up to this many elements. Measured on an H200 (bench/results/issue13/run24): with its
# prologue the GEMV beats cuBLAS and the norm/SiLU kernel on Qwen3-0.6B's linears (4-12 MB of weights: 1.05 ->
# 0.65 ms a token at 1 row, 1.08 -> 0.77 at 2), and loses on Qwen3-8B's (32-200 MB, which cuBLAS streams at
# over 3 TB/s: 4.45 -> 4.91 ms at 1 row).
GEMV_MAX_WEIGHT_ELEMENTS = 8 << 20


def _gemv(x: torch.Tensor, weight: torch.Tensor, kernel: str) -> bool:
    if kernel != "auto":
        return kernel == "triton"
    return (x.is_cuda and 0 < x.shape[0] <= GEMV_MAX_ROWS and weight.numel() <= GEMV_MAX_WEIGHT_ELEMENTS
            and triton_gemv.available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           kernel: str = "auto") -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T + bias; `kernel` "triton" or "torch" forces one (tests, bench/kernel_check.py)."""
    if _gemv(x, weight, kernel):
        return triton_gemv.gemv(x, weight, bias)[0]
    return F.linear(x, weight, bias)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(RMSNorm(x + residual)), x + residual), or without a residual (linear(RMSNorm(x)), x): the
    decoder layer's norm and the projection after it. The torch path may reuse x's and residual's memory."""
    if _gemv(x, weight, kernel):
        if residual is None:
            return triton_gemv.gemv(x, weight, bias, triton_gemv.RMSNORM, norm_weight=norm_weight, eps=eps)[0], x
        y, summed = triton_gemv.gemv(x, weight, bias, triton_gemv.ADD_RMSNORM, residual, norm_weight, eps)
        assert summed is not None
        return y, summed
    if residual is None:
        return F.linear(rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), residual


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    kernel: str = "auto") -> torch.Tensor:
    """linear(silu(gate) * up) of x = [gate | up]: the gated MLP's activation and its down projection."""
    if _gemv(x, weight, kernel):
        return triton_gemv.gemv(x, weight, bias, triton_gemv.SILU_MUL)[0]
    return F.linear(silu_and_mul(x), weight, bias)
