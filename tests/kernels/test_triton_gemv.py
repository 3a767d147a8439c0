"""The fused GEMV (kernels/triton_gemv.py) against the torch path of kernels/fused.py, on CPU tensors under
TRITON_INTERPRET=1 (conftest.py): each prologue, row counts that do and do not fill the tile, K and N that
the tile does not divide, with and without a bias. bench/kernel_check.py --gemv repeats this on the GPU."""
from __future__ import annotations

import pytest
import torch

from llmrpc.kernels import fused, triton_gemv
from llmrpc.kernels.triton_gemv import Tile

pytest.importorskip("triton")

# (N, K, tile): a tile that divides neither, one wider than K, and the default one.
SHAPES = [(40, 96, Tile(16, 64, 4)), (24, 48, Tile(8, 64, 2)), (64, 128, None)]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    residual = torch.randn(m, k, generator=g).to(dtype)
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, residual, norm_weight, weight, b


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the interpreter rounds to bf16 toward zero, the torch path to nearest: one ulp at each rounding point
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize(("n", "k", "tile"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_and_norm_linear_match_the_torch_path(dtype, m, n, k, tile, bias) -> None:
    x, residual, norm_weight, weight, b = _inputs(m, n, k, dtype, bias, seed=m * 100 + n)
    _close(triton_gemv.gemv(x, weight, b, tile=tile)[0], fused.linear(x, weight, b, kernel="torch"), dtype)

    y, summed = triton_gemv.gemv(x, weight, b, triton_gemv.ADD_RMSNORM, residual, norm_weight, 1e-6, tile)
    want_y, want_sum = fused.norm_linear(x.clone(), residual.clone(), norm_weight, 1e-6, weight, b, kernel="torch")
    assert summed is not None
    if dtype == torch.float32:
        assert torch.equal(summed, want_sum)  # the new residual stream, exactly
    else:
        torch.testing.assert_close(summed, want_sum, rtol=8e-3, atol=0)  # one ulp, rounded toward zero
    _close(y, want_y, dtype)

    y, none = triton_gemv.gemv(x, weight, b, triton_gemv.RMSNORM, norm_weight=norm_weight, eps=1e-6, tile=tile)
    want_y, same = fused.norm_linear(x, None, norm_weight, 1e-6, weight, b, kernel="torch")
    assert none is None and same is x
    _close(y, want_y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize(("n", "k", "tile"), SHAPES)
def test_silu_mul_linear_matches_the_torch_path(dtype, m, n, k, tile) -> None:
    g = torch.Generator().manual_seed(m + n)
    gate_up = torch.randn(m, 2 * k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    want = fused.silu_mul_linear(gate_up, weight, kernel="torch")
    _close(triton_gemv.gemv(gate_up, weight, prologue=triton_gemv.SILU_MUL, tile=tile)[0], want, dtype)
    _close(fused.silu_mul_linear(gate_up, weight, kernel="triton"), want, dtype)


def test_the_dispatch_takes_a_strided_input_and_the_first_layers_norm() -> None:
    """x a view with a row stride of its own (a slice of a wider buffer); no residual: (y, x) as the torch path."""
    g = torch.Generator().manual_seed(7)
    buffer = torch.randn(2, 80, generator=g)
    x = buffer[:, :64]
    norm_weight, weight = torch.rand(64, generator=g) + 0.5, torch.randn(32, 64, generator=g)
    got, residual = fused.norm_linear(x, None, norm_weight, 1e-5, weight, kernel="triton")
    want, _ = fused.norm_linear(x, None, norm_weight, 1e-5, weight, kernel="torch")
    assert residual is x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_rows_launch_nothing_and_bad_shapes_are_refused() -> None:
    weight = torch.randn(8, 16)
    y, _ = triton_gemv.gemv(torch.empty(0, 16), weight)
    assert y.shape == (0, 8)
    with pytest.raises(ValueError, match="does not feed"):
        triton_gemv.gemv(torch.randn(2, 8), weight)
    with pytest.raises(ValueError, match="does not feed"):
        triton_gemv.gemv(torch.randn(2, 16), weight, prologue=triton_gemv.SILU_MUL)
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_gemv.gemv(torch.randn(17, 16), weight)
    with pytest.raises(ValueError, match="residual"):
        triton_gemv.gemv(torch.randn(2, 16), weight, prologue=triton_gemv.ADD_RMSNORM, norm_weight=torch.ones(16))


def test_default_tiles_cover_a_weight_tile_of_8k_elements() -> None:
    assert triton_gemv.default_tile(4096, 1024) == Tile(8, 1024, 4)
    assert triton_gemv.default_tile(1024, 3072) == Tile(4, 2048, 8)
    assert triton_gemv.default_tile(4, 64) == Tile(4, 64, 4)
