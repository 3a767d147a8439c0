"""A Triton GEMV for the few-row linears of a decode step, fused with the op before it.

At batch 1-4 a linear is a weights read: y [M, N] = a(x) [M, K] @ W^T [K, N] moves
N * K weight elements for M * N * K multiply-adds. cuBLAS picks small-M GEMM tiles and
often a split-K pass with its own reduce kernel, and the norm or SiLU before each
linear is one more launch; in a CUDA-graphed bs=1 decode those fixed costs, not the
bytes, set the step time (issue 13: 0.81 ms of GEMMs a token on Qwen3-0.6B for 0.28 ms
of weights). Here each program owns BLOCK_N output features, streams their weight rows
once over K, and computes its input tile a(x) on the fly from one of four prologues:

- LINEAR: a = x.
- RMSNORM: a = RMSNorm(x) * norm_weight (the first layer's input norm).
- ADD_RMSNORM: s = x + residual, a = RMSNorm(s) * norm_weight; program 0 writes s to
  `residual_out` (a buffer of its own: other programs still read `residual`).
- SILU_MUL: x = [gate | up], a = silu(gate) * up (the MLP's down projection).

Every program recomputes the norm's sum of squares over x's row (K elements from L2,
small beside its weight rows). Rounding follows the torch references in
kernels/fused.py: s rounded to the model dtype, the norm in float32 rounded before the
weight multiplies it and after; silu(gate) rounded before it multiplies up; products
accumulate in float32 and y is rounded once.

Triton is imported on first use. Under TRITON_INTERPRET=1 the kernel runs on CPU
tensors; the tests use that to check it against the torch path.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch

LINEAR, RMSNORM, ADD_RMSNORM, SILU_MUL = 0, 1, 2, 3
MAX_ROWS = 16  # a program's tile holds every row of x at once


class Tile(NamedTuple):
    """One launch's shape: output features and input elements per program step, warps per program."""

    block_n: int
    block_k: int
    num_warps: int


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_tile(n: int, k: int) -> Tile:
    """The tile for an [n, k] weight. A program's weight tile is ~8K elements (16 KB of bf16), as wide in K as
    K allows up to 2,048, so each program has its whole share of the weights in flight in one or two steps,
    and there are ~2 programs or more per SM on an H200 for Qwen3-0.6B's and -8B's linears
    (bench/kernel_check.py --gemv sweeps the alternatives)."""
    block_k = min(next_pow2(k), 2048)
    block_n = max(1, min(8192 // block_k, next_pow2(n)))
    return Tile(block_n, block_k, 8 if block_k >= 2048 else 4)  # 8 warps: x's 4 rows of 2,048 fit in registers


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # The row count is 1-4 and changes between graphs; the tile's BLOCK_M covers it, so M is a plain argument.
    @triton.jit(do_not_specialize=["M"])
    def gemv_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, b_ptr, y_ptr,
                    M, N, x_stride, res_stride, y_stride, eps,
                    K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        dtype = y_ptr.dtype.element_ty
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        x_rows = x_ptr + rows[:, None].to(tl.int64) * x_stride
        r_rows = res_ptr + rows[:, None].to(tl.int64) * res_stride
        w_rows = w_ptr + cols[:, None].to(tl.int64) * K

        inv_rms = tl.zeros((BLOCK_M,), tl.float32)
        if PROLOGUE == 1 or PROLOGUE == 2:
            squares = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (ks < K)[None, :]
                s = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
                if PROLOGUE == 2:
                    s = (s + tl.load(r_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)).to(dtype)
                    tl.store(res_out_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], s, mask=mask & (pid == 0))
                    s = s.to(tl.float32)
                squares += tl.sum(s * s, axis=1)
            inv_rms = tl.rsqrt(squares / K + eps)

        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            mask = row_mask[:, None] & k_mask[None, :]
            a = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            if PROLOGUE == 1 or PROLOGUE == 2:
                if PROLOGUE == 2:
                    a = (a + tl.load(r_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)).to(dtype)
                    a = a.to(tl.float32)
                norm_w = tl.load(norm_w_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                a = ((a * inv_rms[:, None]).to(dtype).to(tl.float32) * norm_w[None, :]).to(dtype).to(tl.float32)
            elif PROLOGUE == 3:
                up = tl.load(x_rows + K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
                a = (a / (1.0 + tl.exp(-a))).to(dtype).to(tl.float32)
                a = (a * up).to(dtype).to(tl.float32)
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :]
        tl.store(y, acc.to(dtype), mask=row_mask[:, None] & col_mask[None, :])

    return triton, gemv_kernel


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: int = LINEAR,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         tile: Tile | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a(x) @ weight^T + bias, x + residual for ADD_RMSNORM else None): x [M, K] (or [M, 2K] for SILU_MUL,
    gate then up) with unit stride along K, weight [N, K] contiguous, M at most MAX_ROWS."""
    m = x.shape[0]
    n, k = weight.shape
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != (2 * k if prologue == SILU_MUL else k):
        raise ValueError(f"x {tuple(x.shape)} does not feed weight {tuple(weight.shape)} (prologue {prologue})")
    if not weight.is_contiguous() or m > MAX_ROWS:
        raise ValueError(f"gemv takes a contiguous weight and at most {MAX_ROWS} rows, got {m} rows")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(m, k, dtype=x.dtype, device=x.device) if prologue == ADD_RMSNORM else None
    if m == 0:
        return y, residual_out
    if prologue in (RMSNORM, ADD_RMSNORM) and norm_weight is None:
        raise ValueError("a norm prologue needs norm_weight")
    if prologue == ADD_RMSNORM and (residual is None or residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"ADD_RMSNORM needs a residual shaped like x {tuple(x.shape)}")
    triton, kernel = _kernel()
    tile = tile or default_tile(n, k)
    res = residual if residual is not None else x
    kernel[(triton.cdiv(n, tile.block_n),)](
        x, res, residual_out if residual_out is not None else y, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, y, m, n, x.stride(0), res.stride(0), y.stride(0), eps,
        K=k, PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_M=max(next_pow2(m), 1),
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps)
    return y, residual_out
