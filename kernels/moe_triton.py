"""The Triton kernels of kernels/moe.py's fused MoE: align, then one grouped GEMM kernel run twice
(gate_up with SiLU-and-mul in its epilogue, then down scaled by the router weights).

Imported only where Triton is installed and a CUDA tensor reaches `fused_moe`
(tests run it on the CPU under TRITON_INTERPRET=1). Tiles are chosen by the
step's token count, a host-side int, so one captured decode graph always
replays the same kernels. Every loop bound is a compile-time constant of the
model's shape (hidden size, expert width, expert count), never the token count:
no recompilation per batch, and the GEMMs' K loops stay software-pipelined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmrpc.kernels.moe import MoEAlignment, max_padded_rows, moe_align_torch


@dataclass(frozen=True)
class TileConfig:
    """The tiles of one grouped GEMM (block_m is the alignment's, shared by both GEMMs)."""

    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoETiles:
    block_m: int
    gate_up: TileConfig
    down: TileConfig


# By tokens per step, first fit. Guessed from vLLM's H200 tables for E=128, N=768 (a gate_up tile
# holds two accumulators, gate and up, so its block_n is half theirs); bench/moe_check.py --sweep
# measures the alternatives.
TILES: tuple[tuple[int, MoETiles], ...] = (
    (64, MoETiles(16, TileConfig(32, 128, 1, 4, 4), TileConfig(64, 128, 1, 4, 4))),
    (256, MoETiles(16, TileConfig(64, 128, 1, 4, 3), TileConfig(128, 128, 1, 4, 3))),
    (1024, MoETiles(64, TileConfig(64, 64, 8, 4, 3), TileConfig(128, 64, 8, 4, 3))),
    (1 << 62, MoETiles(128, TileConfig(64, 64, 8, 8, 4), TileConfig(128, 64, 8, 8, 4))),
)
# Up to this many (token, expert) pairs one program aligns them (decode); above it the sort-based
# torch ops do (long prefills, where one program's atomics would queue).
ALIGN_KERNEL_MAX_PAIRS = 4096
_ALIGN_CHUNK = 1024


def moe_tiles(num_tokens: int) -> MoETiles:
    return next(t for limit, t in TILES if num_tokens <= limit)


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, cursor_ptr, num_pairs, max_padded,
                  num_blocks, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr,
                  MAX_PAIRS: tl.constexpr, MAX_PADDED: tl.constexpr, CHUNK: tl.constexpr, ROWS_CHUNK: tl.constexpr,
                  BLOCK_CHUNK: tl.constexpr):
    # One program: count the pairs of each expert, lay the padded runs out, then scatter each pair
    # into its expert's run through a per-expert cursor (the atomics give every pair its own row).
    # Loops run to the bounds of the pairs' power-of-two bucket, masked down to this step's.
    offs = tl.arange(0, CHUNK)
    bins = tl.arange(0, EXPERTS_POW2)
    counts = tl.zeros([EXPERTS_POW2], dtype=tl.int32)
    for start in range(0, MAX_PAIRS, CHUNK):
        ok = start + offs < num_pairs
        expert = tl.load(ids_ptr + start + offs, mask=ok, other=0).to(tl.int32)
        counts += tl.histogram(tl.where(ok, expert, NUM_EXPERTS), EXPERTS_POW2)  # lanes past the end: bin E
    counts = tl.where(bins < NUM_EXPERTS, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + bins, ends - padded)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    # Block b belongs to the expert whose run holds its first row: the count of runs ending at or before it.
    for b0 in range(0, MAX_PADDED // BLOCK_M, BLOCK_CHUNK):
        blocks = b0 + tl.arange(0, BLOCK_CHUNK)
        owner = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(owner, NUM_EXPERTS - 1), mask=blocks < num_blocks)
    for r0 in range(0, MAX_PADDED, ROWS_CHUNK):
        rows = r0 + tl.arange(0, ROWS_CHUNK)
        tl.store(sorted_ptr + rows, tl.full([ROWS_CHUNK], 0, tl.int32) + num_pairs, mask=rows < max_padded)
    tl.debug_barrier()  # the cursors and the padding rows are written before any pair lands
    for start in range(0, MAX_PAIRS, CHUNK):
        pair = start + offs
        ok = pair < num_pairs
        expert = tl.load(ids_ptr + pair, mask=ok, other=0).to(tl.int32)
        row = tl.atomic_add(cursor_ptr + expert, tl.full([CHUNK], 1, tl.int32), mask=ok)
        tl.store(sorted_ptr + row, pair.to(tl.int32), mask=ok)


@triton.jit
def _tile_of(pid, max_padded, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks sweep the column blocks together, so their rows stay in L2.
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_pairs,
                     max_padded, stride_am, stride_we, stride_wn, stride_om, N: tl.constexpr, K: tl.constexpr,
                     A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, ROUTED: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    # Per block of sorted pairs, all of one expert e: out[pair, :N] = a[pair // A_ROW_DIV] @ w_e[:N]^T, then
    # GATED (w_e = [gate (N rows) | up (N rows)]): silu(that) * (a @ up_e^T); ROUTED: times weight[pair].
    pid_m, pid_n = _tile_of(tl.program_id(0), max_padded, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc = tl.dot(a, tl.load(w_ptrs, mask=w_ok, other=0.0), acc, input_precision=PRECISION)
        if GATED:
            up = tl.dot(a, tl.load(w_ptrs + N * stride_wn, mask=w_ok, other=0.0), up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if ROUTED:
        acc *= tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """kernels.moe's alignment by one Triton program (rows in any order within an expert)."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    max_padded = max_padded_rows(num_pairs, num_experts, block_m)
    device = flat.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    experts_pow2 = triton.next_power_of_2(num_experts + 1)  # one spare bin counts the lanes past the end
    cursor = torch.empty(experts_pow2, dtype=torch.int32, device=device)
    if num_pairs > ALIGN_KERNEL_MAX_PAIRS:
        raise ValueError(f"the align kernel takes at most {ALIGN_KERNEL_MAX_PAIRS} pairs, got {num_pairs}")
    # Loop bounds of the power-of-two bucket of num_pairs: a few compiled variants, none per batch size.
    bucket = max(16, triton.next_power_of_2(num_pairs))
    bucket_rows = max_padded_rows(bucket, num_experts, block_m)
    _align_kernel[(1,)](flat, sorted_ids, expert_ids, num_padded, cursor, num_pairs, max_padded,
                        max_padded // block_m, NUM_EXPERTS=num_experts, BLOCK_M=block_m, EXPERTS_POW2=experts_pow2,
                        MAX_PAIRS=bucket, MAX_PADDED=bucket_rows, CHUNK=min(_ALIGN_CHUNK, bucket),
                        ROWS_CHUNK=min(_ALIGN_CHUNK, triton.next_power_of_2(bucket_rows)),
                        BLOCK_CHUNK=max(16, 8192 // experts_pow2), num_warps=8)
    return MoEAlignment(sorted_ids, expert_ids, num_padded, block_m)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tiles: MoETiles | None = None,
                     alignment: MoEAlignment | None = None) -> torch.Tensor:
    """kernels.moe.fused_moe: x [T, H], w13 [E, 2I, H], w2 [E, H, I], all contiguous; returns [T, H]."""
    if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_moe_triton needs contiguous x, w13 and w2")
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    tiles = tiles or moe_tiles(num_tokens)
    if alignment is None:
        align = moe_align_triton if num_pairs <= ALIGN_KERNEL_MAX_PAIRS else moe_align_torch
        alignment = align(topk_ids, num_experts, tiles.block_m)
    if alignment.block_m != tiles.block_m:
        raise ValueError(f"alignment block_m {alignment.block_m} != tiles block_m {tiles.block_m}")
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16/fp16 ignore it
    max_padded = alignment.sorted_ids.numel()
    row_blocks = max_padded // tiles.block_m
    weights = topk_weights.reshape(-1).float()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    # gate_up: token rows of x (pair // top_k) → silu(gate) * up; down: pair rows of h → times the router weight.
    for a, w, c, n, k, a_row_div, gated, t in ((x, w13, h, inter, hidden, top_k, True, tiles.gate_up),
                                               (h, w2, out, hidden, inter, 1, False, tiles.down)):
        _moe_gemm_kernel[(row_blocks * triton.cdiv(n, t.block_n),)](
            a, w, c, weights, alignment.sorted_ids, alignment.expert_ids, alignment.num_padded, num_pairs,
            max_padded, a.stride(0), w.stride(0), w.stride(1), c.stride(0), N=n, K=k, A_ROW_DIV=a_row_div,
            GATED=gated, ROUTED=not gated, BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            GROUP_M=t.group_m, PRECISION=precision, num_warps=t.num_warps, num_stages=t.num_stages)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)
