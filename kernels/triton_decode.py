"""Decode attention of a few rows as one Triton kernel a layer: Q/K norm, RoPE, K/V store, attention, merge.

At batch 1-2 a decode step's attention is small work split over many launches: on
Qwen3-0.6B, FlashInfer's decode kernel and its split-KV merge plus the Q/K norm + RoPE
and K/V store kernels before them take ~15 µs a layer (issue 13), most of it each
launch's fixed cost. Here one launch does it all, for rows whose new token is their
only query:

- Each program (row, KV head, split) loads the new token's q heads of its KV head
  group and its k, RMS-normalizes each head (Qwen3's q_norm / k_norm, when weights are
  given) and rotates it, rounding where kernels/triton_fused.py `qk_norm_rope` does.
- Split 0 stores the new k and v into the row's slot (`out_loc`) and counts the new
  token in its softmax from registers; every split reads only the cached tokens
  [0, kv_len - 1) of its own share from the pages, so no program reads a slot another
  is writing.
- Splits share a row's context evenly (the split count is fixed per launch, so a CUDA
  graph replays it at any context length). Each writes its unnormalized output and its
  running max and sum to a float32 workspace, then counts itself done on the row and KV
  head's counter; the last to finish merges all splits into the output and resets the
  counter for the next launch. Softmax runs in base 2, scores and products in float32.

Triton is imported on first use. Under TRITON_INTERPRET=1 the kernel runs on CPU
tensors; the tests use that to check it against the torch backend.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from llmrpc.kernels import triton_fused
from llmrpc.kernels.triton_gemv import next_pow2

if TYPE_CHECKING:
    from llmrpc.engine.kv_cache import KVPool
    from llmrpc.engine.layers.norm import RMSNorm
    from llmrpc.engine.layers.rotary import Rope

MAX_ROWS = 16  # the most rows EngineConfig.fused_decode_max_rows may route here
MAX_SPLITS = 32
BLOCK_N = 32  # cached tokens a program step: [32, head_dim / 2] K and V tiles, two of each (and the next block's)
# 4 warps, with the tiles and their prefetch in 168 registers and an 8-16 byte stack frame on sm_90, measured
# faster than 8 without one (bench/results/issue13/run29: 9.0 vs 10.5 µs at 640 tokens, 19.6 vs 20.0 at 8,192).
NUM_WARPS = 4


def supports(kv_dtype: torch.dtype, q_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs on this pool: pages in the model's 16-bit dtype, a power-of-two head dim."""
    return (triton_fused.available() and kv_dtype == q_dtype and q_dtype in (torch.float16, torch.bfloat16)
            and head_dim >= 32 and head_dim & (head_dim - 1) == 0)  # a tensor-core dot's K of half a head >= 16


def default_splits(rows: int, kv_heads: int, device: torch.device) -> int:
    """Splits per row and KV head: two programs an SM (four splits on the CPU). Only the splits a row's
    context fills run past their first loads, so short contexts pay little for the many."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, 2 * sms // max(rows * kv_heads, 1)))


class Workspace:
    """Partial outputs, maxima and sums of every split, and the per (row, KV head) counters the last split
    finds itself by; for up to `max_rows` rows. The counters start at zero and each launch leaves them so."""

    def __init__(self, max_rows: int, kv_heads: int, group: int, head_dim: int, device: torch.device) -> None:
        self.max_rows, self.kv_heads, self.group, self.head_dim = max_rows, kv_heads, group, head_dim
        group_block = next_pow2(group)
        self.partial_o = torch.empty(max_rows * kv_heads * MAX_SPLITS * group_block * head_dim, dtype=torch.float32,
                                     device=device)
        self.partial_ml = torch.empty(max_rows * kv_heads * MAX_SPLITS * group_block * 2, dtype=torch.float32,
                                      device=device)
        self.counters = torch.zeros(max_rows * kv_heads, dtype=torch.int32, device=device)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(q_ptr, k_ptr, v_ptr, q_row_stride, k_row_stride, v_row_stride,
                      q_weight_ptr, k_weight_ptr, eps, positions_ptr, cos_sin_ptr, cos_sin_stride,
                      k_cache_ptr, v_cache_ptr, kv_indptr_ptr, kv_indices_ptr, last_page_len_ptr, out_loc_ptr,
                      out_ptr, partial_o_ptr, partial_ml_ptr, counters_ptr, scale_log2,
                      PAGE_SIZE: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                      HEAD_DIM: tl.constexpr, NORM: tl.constexpr, SPLITS: tl.constexpr,
                      GROUP_BLOCK: tl.constexpr, Q_BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)  # the KV head; its q heads are [head * GROUP, head * GROUP + GROUP)
        split = tl.program_id(2)
        HALF: tl.constexpr = HEAD_DIM // 2
        ROW: tl.constexpr = KV_HEADS * HEAD_DIM  # one token's K (or V) in the pages
        dtype = q_ptr.dtype.element_ty
        dims = tl.arange(0, HALF)

        # ---- this split's share of the cached tokens: BLOCK_N-aligned, and `parts` splits hold any -----
        page0 = tl.load(kv_indptr_ptr + row)
        cached = (tl.load(kv_indptr_ptr + row + 1) - page0 - 1) * PAGE_SIZE + tl.load(last_page_len_ptr + row) - 1
        share = tl.cdiv(tl.cdiv(cached, SPLITS), BLOCK_N) * BLOCK_N
        parts = tl.maximum(tl.cdiv(cached, tl.maximum(share, 1)), 1)  # split 0 has the new token at least
        lo = split * share
        hi = tl.minimum(lo + share, cached)
        if split < parts:  # the others have nothing to do
            # q's heads as the rows of a tensor-core tile (Q_BLOCK >= 16), those past GROUP zero, never stored.
            qh = tl.arange(0, Q_BLOCK)
            qh_mask = qh < GROUP
            # The first block's K and V in flight while the new token is prepared.
            tokens = lo + tl.arange(0, BLOCK_N)
            real = tokens < hi
            page = tl.load(kv_indices_ptr + page0 + tokens // PAGE_SIZE, mask=real, other=0).to(tl.int64)
            slots = ((page * PAGE_SIZE + tokens % PAGE_SIZE) * ROW + head * HEAD_DIM)[:, None]
            kc1 = tl.load(k_cache_ptr + slots + dims[None, :], mask=real[:, None], other=0.0)
            kc2 = tl.load(k_cache_ptr + slots + HALF + dims[None, :], mask=real[:, None], other=0.0)
            vc1 = tl.load(v_cache_ptr + slots + dims[None, :], mask=real[:, None], other=0.0)
            vc2 = tl.load(v_cache_ptr + slots + HALF + dims[None, :], mask=real[:, None], other=0.0)

            # ---- the new token: q heads [Q_BLOCK, HALF] x 2 halves, k and v [1, HALF] x 2 -------------
            pos = tl.load(positions_ptr + row).to(tl.int64)
            angle = cos_sin_ptr + pos * cos_sin_stride + dims[None, :]
            cos = tl.load(angle)
            sin = tl.load(angle + HALF)
            q_base = q_ptr + row.to(tl.int64) * q_row_stride + (head * GROUP + qh[:, None]) * HEAD_DIM
            q1 = tl.load(q_base + dims[None, :], mask=qh_mask[:, None], other=0.0).to(tl.float32)
            q2 = tl.load(q_base + HALF + dims[None, :], mask=qh_mask[:, None], other=0.0).to(tl.float32)
            k_base = k_ptr + row.to(tl.int64) * k_row_stride + head * HEAD_DIM
            k1 = tl.load(k_base + dims[None, :]).to(tl.float32)
            k2 = tl.load(k_base + HALF + dims[None, :]).to(tl.float32)
            if NORM:  # rounded where qk_norm_rope rounds: the normalized value, then its product with the weight
                inv_q = tl.rsqrt((tl.sum(q1 * q1, axis=1) + tl.sum(q2 * q2, axis=1)) / HEAD_DIM + eps)[:, None]
                inv_k = tl.rsqrt((tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / HEAD_DIM + eps)[:, None]
                qw1 = tl.load(q_weight_ptr + dims).to(tl.float32)[None, :]
                qw2 = tl.load(q_weight_ptr + HALF + dims).to(tl.float32)[None, :]
                kw1 = tl.load(k_weight_ptr + dims).to(tl.float32)[None, :]
                kw2 = tl.load(k_weight_ptr + HALF + dims).to(tl.float32)[None, :]
                q1 = ((q1 * inv_q).to(dtype).to(tl.float32) * qw1).to(dtype).to(tl.float32)
                q2 = ((q2 * inv_q).to(dtype).to(tl.float32) * qw2).to(dtype).to(tl.float32)
                k1 = ((k1 * inv_k).to(dtype).to(tl.float32) * kw1).to(dtype).to(tl.float32)
                k2 = ((k2 * inv_k).to(dtype).to(tl.float32) * kw2).to(dtype).to(tl.float32)
            q1, q2 = (q1 * cos - q2 * sin).to(dtype), (q2 * cos + q1 * sin).to(dtype)
            k1, k2 = (k1 * cos - k2 * sin).to(dtype), (k2 * cos + k1 * sin).to(dtype)
            v_base = v_ptr + row.to(tl.int64) * v_row_stride + head * HEAD_DIM
            v1 = tl.load(v_base + dims[None, :])
            v2 = tl.load(v_base + HALF + dims[None, :])
            if split == 0:
                slot = tl.load(out_loc_ptr + row).to(tl.int64) * ROW + head * HEAD_DIM
                tl.store(k_cache_ptr + slot + dims[None, :], k1.to(k_cache_ptr.dtype.element_ty))
                tl.store(k_cache_ptr + slot + HALF + dims[None, :], k2.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + slot + dims[None, :], v1.to(v_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + slot + HALF + dims[None, :], v2.to(v_cache_ptr.dtype.element_ty))

            # Split 0 starts from the new token's score (max m, sum 1, output its v); the others from nothing.
            s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32), axis=1)
                     + tl.sum(q2.to(tl.float32) * k2.to(tl.float32), axis=1)) * scale_log2
            if DOT_F32:
                q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
            first = split == 0
            m = tl.where(first, s_new, -float("inf"))
            denom = tl.where(first, 1.0, 0.0) + tl.zeros((Q_BLOCK,), tl.float32)
            acc1 = tl.where(first, 1.0, 0.0) * v1.to(tl.float32) + tl.zeros((Q_BLOCK, HALF), tl.float32)
            acc2 = tl.where(first, 1.0, 0.0) * v2.to(tl.float32) + tl.zeros((Q_BLOCK, HALF), tl.float32)

            # ---- BLOCK_N cached tokens a step on tensor cores, the next block's loads issued first -------
            start = lo
            while start < hi:  # a while, not range(): the interpreter cannot take loaded bounds
                next_tokens = start + BLOCK_N + tl.arange(0, BLOCK_N)
                next_real = next_tokens < hi
                page = tl.load(kv_indices_ptr + page0 + next_tokens // PAGE_SIZE, mask=next_real, other=0).to(tl.int64)
                slots = ((page * PAGE_SIZE + next_tokens % PAGE_SIZE) * ROW + head * HEAD_DIM)[:, None]
                next_k1 = tl.load(k_cache_ptr + slots + dims[None, :], mask=next_real[:, None], other=0.0)
                next_k2 = tl.load(k_cache_ptr + slots + HALF + dims[None, :], mask=next_real[:, None], other=0.0)
                next_v1 = tl.load(v_cache_ptr + slots + dims[None, :], mask=next_real[:, None], other=0.0)
                next_v2 = tl.load(v_cache_ptr + slots + HALF + dims[None, :], mask=next_real[:, None], other=0.0)
                if DOT_F32:
                    scores = tl.dot(q1, tl.trans(kc1.to(tl.float32))) + tl.dot(q2, tl.trans(kc2.to(tl.float32)))
                else:
                    scores = tl.dot(q1, tl.trans(kc1)) + tl.dot(q2, tl.trans(kc2))  # [Q_BLOCK, BLOCK_N], float32
                scores = tl.where(real[None, :], scores * scale_log2, -float("inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(scores - m_new[:, None])
                denom = denom * alpha + tl.sum(p, axis=1)
                if DOT_F32:
                    acc1 = acc1 * alpha[:, None] + tl.dot(p, vc1.to(tl.float32))
                    acc2 = acc2 * alpha[:, None] + tl.dot(p, vc2.to(tl.float32))
                else:
                    acc1 = acc1 * alpha[:, None] + tl.dot(p.to(dtype), vc1)
                    acc2 = acc2 * alpha[:, None] + tl.dot(p.to(dtype), vc2)
                m = m_new
                kc1, kc2, vc1, vc2, real = next_k1, next_k2, next_v1, next_v2, next_real
                start += BLOCK_N

            q_out = out_ptr + (row.to(tl.int64) * KV_HEADS * GROUP + head * GROUP + qh[:, None]) * HEAD_DIM
            if parts == 1:
                tl.store(q_out + dims[None, :], (acc1 / denom[:, None]).to(dtype), mask=qh_mask[:, None])
                tl.store(q_out + HALF + dims[None, :], (acc2 / denom[:, None]).to(dtype), mask=qh_mask[:, None])
            elif SPLITS > 1:
                # ---- the split's partials, then the last of the row and head's `parts` merges them ---------
                unit = row * KV_HEADS + head
                # The workspace keeps GROUP_BLOCK rows a split (the merge's tile), not the Q_BLOCK of the dots.
                kept = qh < GROUP_BLOCK
                o_base = partial_o_ptr + ((unit * SPLITS + split) * GROUP_BLOCK + qh[:, None]) * HEAD_DIM
                tl.store(o_base + dims[None, :], acc1, mask=kept[:, None])
                tl.store(o_base + HALF + dims[None, :], acc2, mask=kept[:, None])
                ml_base = partial_ml_ptr + ((unit * SPLITS + split) * GROUP_BLOCK + qh) * 2
                tl.store(ml_base, m, mask=kept)
                tl.store(ml_base + 1, denom, mask=kept)
                tl.debug_barrier()  # every thread's partials written before the counter says so (acq_rel, GPU scope)
                done = tl.atomic_add(counters_ptr + unit, 1)
                if done == parts - 1:
                    groups = tl.arange(0, GROUP_BLOCK)
                    group_mask = groups < GROUP
                    out_base = out_ptr + (row.to(tl.int64) * KV_HEADS * GROUP + head * GROUP + groups[:, None]) * HEAD_DIM
                    splits = tl.arange(0, SPLITS_BLOCK)
                    split_mask = splits < parts
                    entry = (unit * SPLITS + splits[:, None]) * GROUP_BLOCK + groups[None, :]  # [SPLITS_BLOCK, GROUP_BLOCK]
                    ms = tl.load(partial_ml_ptr + entry * 2, mask=split_mask[:, None], other=-float("inf"),
                                 cache_modifier=".cg")
                    ls = tl.load(partial_ml_ptr + entry * 2 + 1, mask=split_mask[:, None], other=0.0,
                                 cache_modifier=".cg")
                    m_all = tl.max(ms, axis=0)  # finite: split 0 always holds the new token
                    w = tl.exp2(ms - m_all[None, :])  # [SPLITS_BLOCK, GROUP_BLOCK]
                    inv_l = 1.0 / tl.sum(w * ls, axis=0)
                    o_all = partial_o_ptr + entry[:, :, None] * HEAD_DIM + dims[None, None, :]
                    o1 = tl.load(o_all, mask=split_mask[:, None, None], other=0.0, cache_modifier=".cg")
                    o2 = tl.load(o_all + HALF, mask=split_mask[:, None, None], other=0.0, cache_modifier=".cg")
                    out1 = tl.sum(w[:, :, None] * o1, axis=0) * inv_l[:, None]
                    out2 = tl.sum(w[:, :, None] * o2, axis=0) * inv_l[:, None]
                    tl.store(out_base + dims[None, :], out1.to(dtype), mask=group_mask[:, None])
                    tl.store(out_base + HALF + dims[None, :], out2.to(dtype), mask=group_mask[:, None])
                    tl.atomic_xchg(counters_ptr + unit, 0)

    return triton, decode_kernel


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor, last_page_len: torch.Tensor,
                     out_loc: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, scale: float,
                     workspace: Workspace, splits: int, block_n: int = BLOCK_N,
                     num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Attention output [B, heads, d] of B decode rows (one new token each; q [B, heads, d], k and v
    [B, kv_heads, d] as the QKV projection left them, heads packed, rows any stride), the new K/V stored at
    `out_loc` first. Row r's KV after this step, the new token last, is the pages
    kv_indices[kv_indptr[r]:kv_indptr[r + 1]] (device int32), the last filled to last_page_len[r];
    caches [pages, page_size, kv_heads, d] in q's dtype. q_weight / k_weight: Qwen3's per-head norms (both
    or neither); cos_sin [max_pos, d] float32; `splits` programs share each row and KV head's context, each
    `block_n` tokens a step (bench/kernel_check.py --decode sweeps them and `num_warps`)."""
    rows, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    packed = all(x.dim() == 3 and triton_fused.heads_packed(x) for x in (q, k, v))
    if not packed or heads % kv_heads or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need [B, heads, head_dim] "
                         f"with heads packed and heads a multiple of kv_heads")
    if k_cache.shape[2:] != (kv_heads, head_dim) or k_cache.dtype != q.dtype or not k_cache.is_contiguous():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} does not hold k {tuple(k.shape)} {q.dtype}")
    if (rows > workspace.max_rows or (kv_heads, heads // kv_heads, head_dim) != (
            workspace.kv_heads, workspace.group, workspace.head_dim) or not 1 <= splits <= MAX_SPLITS):
        raise ValueError(f"{rows} rows of {kv_heads} KV heads x {heads // kv_heads} x {head_dim}, {splits} splits: "
                         f"the workspace holds {workspace.max_rows} rows of {workspace.kv_heads} KV heads x "
                         f"{workspace.group} x {workspace.head_dim}, at most {MAX_SPLITS} splits")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if rows == 0:
        return out
    triton, kernel = _kernel()
    group = heads // kv_heads
    group_block = next_pow2(group)
    norm = q_weight is not None
    kernel[(rows, kv_heads, splits)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), q_weight if norm else q, k_weight if norm else k, eps,
        positions, cos_sin, cos_sin.stride(0), k_cache, v_cache, kv_indptr, kv_indices, last_page_len, out_loc,
        out, workspace.partial_o, workspace.partial_ml, workspace.counters, scale * math.log2(math.e),
        PAGE_SIZE=k_cache.shape[1], KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, NORM=norm, SPLITS=splits,
        GROUP_BLOCK=group_block, Q_BLOCK=max(16, group_block), SPLITS_BLOCK=next_pow2(splits), BLOCK_N=block_n,
        # The interpreter (CPU tensors) mishandles bfloat16 in tl.dot (numpy has none): its tiles go to float32
        # first. On a GPU they stay in the model dtype, on tensor cores, the probabilities rounded to it as
        # FlashInfer rounds them.
        DOT_F32=q.device.type != "cuda", num_warps=num_warps)
    return out


class FusedDecode:
    """A decode step's attention as one `decode_attention` launch a layer, over index buffers the caller
    fills before each step (for a CUDA graph: its fixed ones). kv_indptr [B + 1] and last_page_len [B]
    int32, kv_indices int32, out_loc int64 [B], all on the pool's device."""

    def __init__(self, kv_pool: KVPool, scale: float, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 last_page_len: torch.Tensor, out_loc: torch.Tensor, workspace: Workspace, splits: int) -> None:
        self.kv_pool, self.scale, self.workspace, self.splits = kv_pool, scale, workspace, splits
        self.kv_indptr, self.kv_indices, self.last_page_len, self.out_loc = kv_indptr, kv_indices, last_page_len, out_loc

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, rope: Rope,
                 q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> torch.Tensor:
        assert (q_norm is None) == (k_norm is None), "Qwen3's per-head norms come in pairs"
        return decode_attention(
            q, k, v, self.kv_pool.k[layer_id], self.kv_pool.v[layer_id], self.kv_indptr, self.kv_indices,
            self.last_page_len, self.out_loc, rope.positions, rope.cos_sin,
            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
            1e-6 if q_norm is None else q_norm.eps, self.scale, self.workspace, self.splits)
