"""Fused elementwise kernels of the model's layers: RMSNorm, add + RMSNorm, SiLU-and-mul, RoPE.

Each op has a plain PyTorch version (the reference: the CPU path, and any GPU
without FlashInfer) and a FlashInfer version used for CUDA tensors when
flashinfer is importable. On a GPU the torch versions cost 5-12 small kernels
each; in a CUDA-graphed decode step of a small model those launches, not the
bytes, set the step time, so one kernel per op matters there.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def _flashinfer():
    """The flashinfer module, or None where it is not installed (imported on first CUDA use only)."""
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return flashinfer


def _fused(x: torch.Tensor):
    return _flashinfer() if x.is_cuda else None


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
    return _fused(x) is not None


def rope_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates contiguous q [T, heads, d] and k [T, kv_heads, d] in place; cos_sin [max_pos, d] float32."""
    _flashinfer().apply_rope_with_cos_sin_cache_inplace(
        positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1), q.shape[-1], cos_sin, is_neox=True)
