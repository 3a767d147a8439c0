"""Sampling kernels. Race sampling: one categorical draw per row from softmax(logits / T), in one pass, no sort
or cumsum; and FlashInfer's filtered sampling.

The exponential race (the Gumbel-max trick): with E_v ~ Exp(1) independent,
argmax_v exp(l_v / T) / E_v, i.e. argmax_v (l_v / T - log E_v), is distributed
as softmax(l / T). So a draw needs no softmax, no normalization and no CDF:
one read of the logits, noise made on the fly, a running argmax.

The noise is a pure function of (row key, token id): a counter-based hash
(three rounds of the `lowbias32` mixer), so a row's draw depends on its own
64-bit key only, never on the other rows of the batch; the sampler derives a
seeded row's key from (seed, token position), which is what keeps seeded
requests reproducible. The same hash runs as a Triton kernel on CUDA (bf16 or
fp32 logits read as they are) and as plain torch ops elsewhere (the reference,
and the CPU path); both hash the same bits, so they draw the same token except
where float rounding (log, fused multiply-add) decides a near-tie.

E is built from 32 random bits as -log(1 - w), w in (0, 1), with a series for
small w: its smallest values, which decide the race for unlikely tokens, keep
their precision instead of collapsing onto the float32 spacing near 1.

Rows that filter (top-k, top-p, min-p) and carry no seed can instead draw
through FlashInfer's sampling kernels (`filtered_sample_flashinfer`), which
need no sort of the vocabulary.
"""
from __future__ import annotations

import functools

import torch

from llmrpc.kernels import triton_fused

_MASK32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (Wellons): full avalanche in two multiplies
_W_SERIES = 1e-3  # below it, -log(1 - w) = w + w^2/2 + w^3/3 to float32 precision
_W_MAX = 1.0 - 2.0 ** -24  # 32 bits to float32 can round up to 1: keep log(1 - w) finite


# ---- torch reference ----------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32, in halves so the int64 product never overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def race_bits(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 [R, vocab] of 32 random bits per (row key, token id)."""
    keys = keys.to(torch.int64)
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    lo, hi = keys[:, None] & _MASK32, (keys[:, None] >> 32) & _MASK32
    x = _mix32(_mix32(ids[None, :] ^ lo) ^ hi)
    # A third round keyed again: after two rounds, keys that differ in low bits only would give
    # the same noise values permuted over the tokens; this one breaks that.
    return _mix32(x ^ lo)


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) float32 noise from 32 uniform bits (see the module docstring)."""
    w = (bits.to(torch.float32) * 2.0 ** -32 + 2.0 ** -33).clamp_(max=_W_MAX)
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0)))
    return torch.where(w < _W_SERIES, series, -torch.log(1.0 - w))


def race_sample_torch(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [R]: row r's draw from softmax(logits[r] * inv_temperature[r]), noise keyed by keys[r]."""
    noise = exponential_from_bits(race_bits(keys, logits.shape[-1]))
    score = logits.float() * inv_temperature[:, None].float() - noise.log()
    return score.argmax(dim=-1)


# ---- Triton kernel (CUDA) -----------------------------------------------------------------


@functools.cache
def _triton_kernel():
    """The race kernel, built on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def race_kernel(logits_ptr, stride, inv_t_ptr, key_lo_ptr, key_hi_ptr, best_ptr, best_id_ptr,
                    vocab, num_segments, SEGMENT: tl.constexpr, BLOCK: tl.constexpr):
        # Program (row, seg) races the tokens of one vocabulary segment; a tiny argmax over the
        # segments' winners finishes the row (many programs per row keep every SM busy).
        row = tl.program_id(0)
        seg = tl.program_id(1)
        inv_t = tl.load(inv_t_ptr + row)
        key_lo = tl.load(key_lo_ptr + row).to(tl.uint32)
        key_hi = tl.load(key_hi_ptr + row).to(tl.uint32)
        start = seg * SEGMENT
        best = tl.full([], float("-inf"), tl.float32)
        best_id = tl.full([], 0, tl.int32)
        # Constant bounds: the segment is a compile-time size (and Triton's interpreter loops only over those).
        for off in range(0, SEGMENT, BLOCK):
            ids = start + off + tl.arange(0, BLOCK)
            ok = ids < vocab
            logit = tl.load(logits_ptr + row * stride + ids, mask=ok, other=float("-inf")).to(tl.float32)
            # lowbias32 three times, written out: a nested @jit helper would not resolve from this closure.
            x = ids.to(tl.uint32) ^ key_lo
            x = x ^ (x >> 16)
            x = x * 0x7FEB352D
            x = x ^ (x >> 15)
            x = x * 0x846CA68B
            x = (x ^ (x >> 16)) ^ key_hi
            x = x ^ (x >> 16)
            x = x * 0x7FEB352D
            x = x ^ (x >> 15)
            x = x * 0x846CA68B
            x = (x ^ (x >> 16)) ^ key_lo
            x = x ^ (x >> 16)
            x = x * 0x7FEB352D
            x = x ^ (x >> 15)
            x = x * 0x846CA68B
            bits = x ^ (x >> 16)
            w = tl.minimum(bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, 0.99999994)
            series = w * (1.0 + w * (0.5 + w * 0.3333333432674408))
            noise = tl.where(w < 1e-3, series, -tl.log(1.0 - w))
            score = tl.where(ok, logit * inv_t - tl.log(noise), float("-inf"))
            m, i = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            take = m > best  # strict: the first maximum wins, as in torch.argmax
            best_id = tl.where(take, start + off + i, best_id)
            best = tl.where(take, m, best)
        tl.store(best_ptr + row * num_segments + seg, best)
        tl.store(best_id_ptr + row * num_segments + seg, best_id)

    return race_kernel


_SEGMENT = 8192
_BLOCK = 2048


def race_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [R] draws; the Triton kernel for CUDA tensors where Triton is installed, torch otherwise."""
    if logits.is_cuda and triton_fused.available():
        return race_sample_triton(logits, inv_temperature, keys)
    return race_sample_torch(logits, inv_temperature, keys)


def race_sample_triton(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The race as the Triton kernel runs it (CUDA tensors; CPU ones under TRITON_INTERPRET=1)."""
    kernel = _triton_kernel()
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_segments = -(-vocab // _SEGMENT)
    best = torch.empty(rows, num_segments, dtype=torch.float32, device=logits.device)
    best_id = torch.empty(rows, num_segments, dtype=torch.int32, device=logits.device)
    keys = keys.to(torch.int64)
    kernel[(rows, num_segments)](logits, logits.stride(0), inv_temperature.float().contiguous(),
                                 keys & 0xFFFFFFFF, (keys >> 32) & 0xFFFFFFFF, best, best_id,
                                 vocab, num_segments, SEGMENT=_SEGMENT, BLOCK=_BLOCK)
    return best_id.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).to(torch.int64)


# ---- filtered rows through FlashInfer (CUDA) ----------------------------------------------


def filtered_sample_flashinfer(fi, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                               top_p: torch.Tensor, min_p: torch.Tensor | None,
                               generator: torch.Generator) -> torch.Tensor:
    """int64 [R] draws from softmax(logits / T) filtered as engine/sampling.py defines it (min-p and
    top-k, then top-p over what is left), by FlashInfer's kernels (`fi` is the module): no sort.

    `top_k` <= 0 and `top_p` >= 1 mean off; `min_p` None: no row has one. One Philox stream from
    `generator` serves the whole batch, so rows are not keyed one by one: seeded rows never come here.
    """
    probs = fi.sampling.softmax(logits.float(), temperature.float())
    if min_p is not None:
        # min-p and top-k both keep a prefix of the sorted tokens, so masking one before the other
        # keeps the same set; top-k's renormalization then covers both.
        probs = torch.where(probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True), probs, 0.0)
    k = torch.where(top_k > 0, top_k, probs.shape[-1]).to(torch.int32)
    return fi.sampling.top_k_top_p_sampling_from_probs(probs, k, top_p.float(), filter_apply_order="top_k_first",
                                                       generator=generator).to(torch.int64)
