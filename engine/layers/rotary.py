"""Rotary position embedding (the half-split "neox" layout HF Llama/Qwen use), with scaling.

The cos/sin table covers every position up to the engine's context length and is
computed once in float32; a forward pass indexes it by position, so rows of one
batch can sit at any positions.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmrpc.kernels import fused

if TYPE_CHECKING:
    from llmrpc.engine.layers.norm import RMSNorm


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair inverse frequencies, as transformers computes them for each rope type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32: cos then sin

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.to(torch.float32))
        # A buffer, not a parameter: the loader never sees it; float32 whatever the model dtype.
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1).float(), persistent=False)

    def cos_sin_for(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] for the tokens at `positions`, shared by all layers of a pass."""
        return fused.rope_cos_sin(self.cos_sin, positions, dtype)

    def for_positions(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation of one forward pass, applied by every layer."""
        if fused.rope_inplace_supported(positions):
            return Rope(positions, self.cos_sin, None, None)
        cos, sin = self.cos_sin_for(positions, dtype)
        return Rope(positions, self.cos_sin, cos, sin)


class Rope:
    """Rotates q and k of one pass (after Qwen3's per-head norms, when given): one fused in-place kernel
    on CUDA, else the torch reference over cos/sin gathered once per pass."""

    def __init__(self, positions: torch.Tensor, cos_sin: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None) -> None:
        self.positions, self.cos_sin, self.cos, self.sin = positions, cos_sin, cos, sin

    def __call__(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None,
                 k_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """On CUDA q and k (views into the QKV output) are rewritten in place and returned."""
        if self.cos is None or self.sin is None:  # both or neither
            fused.qk_norm_rope_(q, k, self.positions, self.cos_sin, None if q_norm is None else q_norm.weight,
                                None if k_norm is None else k_norm.weight, 0.0 if q_norm is None else q_norm.eps)
            return q, k
        if q_norm is not None and k_norm is not None:  # both or neither
            q, k = q_norm(q), k_norm(k)
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its position's angle."""
    return fused.rope_torch(x, cos, sin)
