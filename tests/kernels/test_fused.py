"""The fused-op layer on the CPU: the torch reference path, exact against the plain formulas."""
from __future__ import annotations

import torch

from llmrpc.kernels import fused
from llmrpc.kernels.registry import _BACKENDS, resolve_attention_backend


def test_add_rms_norm_is_the_norm_of_the_sum_and_returns_the_sum() -> None:
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
    normed, s = fused.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r)
    assert torch.equal(normed, fused.rms_norm(x + r, w, 1e-6))
    expected = w * (s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(normed, expected, atol=1e-6, rtol=1e-6)


def test_silu_and_mul_and_rope_reference() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=g)
    assert torch.equal(fused.silu_and_mul(x), torch.nn.functional.silu(x[:, :8]) * x[:, 8:])
    q = torch.randn(3, 2, 8, generator=g)
    angle = torch.rand(3, 1, 4, generator=g)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    out = fused.rope_torch(q, cos, sin)
    # Pair (i, i + d/2) is rotated by its angle.
    x1, x2 = q[..., :4], q[..., 4:]
    torch.testing.assert_close(out[..., :4], x1 * angle.cos() - x2 * angle.sin())
    torch.testing.assert_close(out[..., 4:], x2 * angle.cos() + x1 * angle.sin())
    assert not fused.rope_inplace_supported(q)  # CPU tensors never take the FlashInfer path


def test_flashinfer_is_registered_but_auto_needs_it_importable() -> None:
    assert _BACKENDS["flashinfer"] == "llmrpc.kernels.flashinfer_backend:FlashInferAttentionBackend"
    expected = "flashinfer" if fused.flashinfer_module() is not None else "torch"
    assert resolve_attention_backend("auto", "cuda") == expected
    assert resolve_attention_backend("auto", "cpu") == "torch"
