"""Next-token sampling for a batch where every row has its own parameters.

Per slot, set at admission: temperature (0 = greedy: exactly argmax), top-k,
top-p, min-p, a seed, penalties, and how many logprobs to return. The pipeline
for a row, on float32 logits:

1. penalties over the slot's history: repetition (prompt and output tokens:
   positive logits divided by it, negative ones multiplied), then frequency
   (times the token's output count) and presence (once per output token seen);
   then, for rows with a grammar, the tokens it forbids go to -inf (engine/constraint.py);
2. greedy rows: argmax, done;
3. rows that filter nothing (no top-k, top-p or min-p): the exponential race,
   argmax(logits / T - log E) with E ~ Exp(1) per token (kernels/sampling.py):
   one pass over the logits as they come (bf16 on a GPU), no softmax, no CDF;
4. rows that filter: divide by temperature, softmax, sort descending; keep
   tokens with p >= min_p * p_max, then the top_k first, then (renormalized over
   what is left) the shortest prefix whose mass reaches top_p; draw one uniform
   number through the inverse CDF of what is left. On a GPU with FlashInfer, an
   unseeded row draws from the same distribution through FlashInfer's sampling
   kernels instead (softmax, top-k renormalization, top-p rejection sampling:
   no sort of the vocabulary); seeded rows keep the sort, whose one uniform per
   row is what (seed, position) fixes.

Randomness is one 64-bit race key or one uniform per row and step. A seeded
request's comes from a generator keyed by (seed, position of the sampled token),
so it draws the same tokens whatever else shares its batches, and also when it is
retracted and recomputed; unseeded rows use the engine's own generator. Logprobs
are of the model's raw distribution (before penalties and temperature), as vLLM
reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from llmrpc.engine.step import SlotParams
from llmrpc.kernels import fused
from llmrpc.kernels.sampling import filtered_sample_flashinfer, race_sample

_KEY_HIGH = np.iinfo(np.int64).max


@dataclass
class SampleResult:
    tokens: torch.Tensor  # int64 [S], on the device
    logprobs: torch.Tensor | None = None  # float32 [S] of each sampled token
    top_ids: torch.Tensor | None = None  # int64 [S, N]
    top_logprobs: torch.Tensor | None = None  # float32 [S, N]


def filter_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sorted descending with filtered tokens at 0, renormalized; their token ids).

    `top_k` <= 0 means off; `top_p` >= 1 means off.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=logits.device)
    keep = probs >= min_p[:, None] * probs[:, :1]
    keep &= (ranks[None, :] < top_k[:, None]) | (top_k[:, None] <= 0)
    kept = probs * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    mass_before = kept.cumsum(dim=-1) - kept
    # top_p = 1 is skipped, not applied: rounding could otherwise drop the tail.
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True), sorted_ids


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from, in vocabulary order."""
    probs, ids = filter_sorted(logits, temperature, top_k, top_p, min_p)
    return torch.zeros_like(probs).scatter_(-1, ids, probs)


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Penalized copy of `logits` [R, V] given each row's prompt tokens (mask) and output token counts."""
    counts = output_counts.to(logits.dtype)
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (output_counts > 0).to(logits.dtype)


class Sampler:
    """Holds every slot's sampling parameters and history; samples one batch at a time."""

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device | str, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.temperature = np.ones(max_slots, dtype=np.float32)
        self.top_p = np.ones(max_slots, dtype=np.float32)
        self.top_k = np.full(max_slots, -1, dtype=np.int64)
        self.min_p = np.zeros(max_slots, dtype=np.float32)
        self.repetition = np.ones(max_slots, dtype=np.float32)
        self.presence = np.zeros(max_slots, dtype=np.float32)
        self.frequency = np.zeros(max_slots, dtype=np.float32)
        self.penalized = np.zeros(max_slots, dtype=bool)
        self.logprobs = np.full(max_slots, -1, dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        # FlashInfer's samplers for unseeded filtering rows on a GPU, drawing from a device generator.
        self._fi = fused.flashinfer_module() if self.device.type == "cuda" else None
        self._generator: torch.Generator | None = None
        self.seeds = np.zeros(max_slots, dtype=np.uint64)
        self.seeded = np.zeros(max_slots, dtype=bool)
        # [max_slots, vocab] history, allocated when the first request with a penalty arrives.
        self._prompt_mask: torch.Tensor | None = None
        self._output_counts: torch.Tensor | None = None

    def admit(self, p: SlotParams) -> None:
        """A new request takes slot `p.slot`: its parameters, seed and history start over."""
        if p.temperature < 0 or not 0 < p.top_p <= 1 or not 0 <= p.min_p <= 1 or p.repetition_penalty <= 0:
            raise ValueError(f"slot {p.slot}: invalid sampling parameters {p}")
        s = p.slot
        self.temperature[s], self.top_p[s], self.min_p[s] = p.temperature, p.top_p, p.min_p
        self.top_k[s] = p.top_k if p.top_k > 0 else -1
        self.repetition[s], self.presence[s], self.frequency[s] = (
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        self.logprobs[s] = p.logprobs
        self.seeds[s] = p.seed or 0
        self.seeded[s] = p.seed is not None
        self.penalized[s] = p.uses_penalties
        if self.penalized[s]:
            if self._output_counts is None or self._prompt_mask is None:
                shape = (len(self.temperature), self.vocab_size)
                self._prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
                self._output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._output_counts[s].zero_()
            self._prompt_mask[s].zero_()
            if p.prompt_tokens:
                self._prompt_mask[s, torch.tensor(p.prompt_tokens, dtype=torch.long, device=self.device)] = True
            if p.output_tokens:  # a recompute: the outputs so far count as they did before the retraction
                outputs = torch.tensor(p.output_tokens, dtype=torch.long, device=self.device)
                self._output_counts[s].index_put_((outputs,), torch.ones_like(outputs, dtype=torch.int32),
                                                  accumulate=True)

    def _rows(self, values: np.ndarray, slots: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(values[slots]).to(self.device, dtype, non_blocking=True)

    def _draw_rng(self, slot: int, position: int) -> np.random.Generator:
        """The generator of one draw: (seed, position) for a seeded slot, else the engine's own."""
        if self.seeded[slot]:
            return np.random.default_rng((int(self.seeds[slot]), int(position)))
        return self._rng

    def _keys(self, slots: np.ndarray, positions: np.ndarray, race: np.ndarray) -> np.ndarray:
        """One race key per row; a seeded racing row's comes from its own (seed, position)."""
        keys = self._rng.integers(0, _KEY_HIGH, size=len(slots), dtype=np.int64)
        for row in np.flatnonzero(self.seeded[slots] & race):
            keys[row] = self._draw_rng(int(slots[row]), int(positions[row])).integers(0, _KEY_HIGH, dtype=np.int64)
        return keys

    def _uniforms(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return np.array([self._draw_rng(int(s), int(p)).random() for s, p in zip(slots, positions)])

    def _filters(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._rows(self.temperature, slots, torch.float32), self._rows(self.top_k, slots, torch.int64),
                self._rows(self.top_p, slots, torch.float32), self._rows(self.min_p, slots, torch.float32))

    def _sort_draw(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Filtering rows by sort and inverse CDF, one uniform each from `_draw_rng`."""
        probs, ids = filter_sorted(logits.float(), *self._filters(slots))
        cdf = probs.cumsum(dim=-1)
        uniform = torch.from_numpy(self._uniforms(slots, positions)).to(self.device, torch.float32, non_blocking=True)
        pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).clamp_(max=self.vocab_size - 1)
        return ids.gather(1, pick).squeeze(1)

    def _kernel_draw(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Unseeded top-k / top-p rows (no min-p) through FlashInfer's kernels (no sort)."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(int(self._rng.integers(1 << 62)))
        temperature, top_k, top_p, _ = self._filters(slots)
        return filtered_sample_flashinfer(self._fi, logits, temperature, top_k, top_p, None, self._generator)

    def warm_up(self, logits: torch.Tensor) -> None:
        """One draw down each device path (the race; FlashInfer's filters where present) from logits
        [1, V], so their kernels are built before the first request; no slot or generator state moves."""
        one = torch.ones(1, device=self.device)
        race_sample(logits, one, torch.zeros(1, dtype=torch.int64, device=self.device))
        if self._fi is not None:
            filtered_sample_flashinfer(self._fi, logits, one, torch.full((1,), 2, device=self.device),
                                       0.9 * one, 0.1 * one, torch.Generator(device=self.device))

    def sample(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray,
               constrain: Callable[[torch.Tensor], None] | None = None) -> SampleResult:
        """Row i of `logits` [S, V] belongs to `slots[i]` and samples the token at `positions[i]` of its
        sequence (the number of tokens before it); returns the sampled tokens on the device.

        `logits` may be bf16: greedy and race rows read it as it is; only penalties, filters and
        logprobs work on a float32 copy, so the common case never upcasts the [S, V] block.
        `constrain` (engine/constraint.py's mask) sets the logits that constrained rows' grammars
        forbid to -inf, in place, after the penalties and before every draw; logprobs stay of the
        raw distribution.
        """
        raw = logits
        top_n = int(self.logprobs[slots].max(initial=-1))
        rows = np.flatnonzero(self.penalized[slots])
        if len(rows):
            assert self._prompt_mask is not None and self._output_counts is not None  # admit made them
            r, s = torch.from_numpy(rows).to(self.device, non_blocking=True), torch.from_numpy(slots[rows]).to(self.device, non_blocking=True)
            logits = logits.to(torch.float32, copy=True)
            logits[r] = apply_penalties(logits[r], self._prompt_mask[s], self._output_counts[s],
                                        self._rows(self.repetition, slots[rows], torch.float32),
                                        self._rows(self.frequency, slots[rows], torch.float32),
                                        self._rows(self.presence, slots[rows], torch.float32))
        if constrain is not None:
            if logits is raw and top_n >= 0:
                logits = logits.clone()  # the logprobs read the unmasked logits
            constrain(logits)
        temperature = self.temperature[slots]
        greedy = temperature <= 0.0
        filters = (self.top_k[slots] > 0) | (self.top_p[slots] < 1.0) | (self.min_p[slots] > 0.0)
        race = ~greedy & ~filters
        filtered = ~greedy & filters
        tokens = logits.argmax(dim=-1) if greedy.any() else None
        if race.any():
            # Greedy and filtering rows race too (cheaper than gathering the racing rows' logits)
            # and are then overwritten; their keys come from the engine's generator, so no seeded
            # request's sequence moves.
            inv_t = (1.0 / np.where(race, temperature, 1.0)).astype(np.float32)
            keys = self._keys(slots, positions, race)
            drawn = race_sample(logits, torch.from_numpy(inv_t).to(self.device, non_blocking=True),
                                torch.from_numpy(keys).to(self.device, non_blocking=True))
            if tokens is None:
                tokens = drawn
            else:
                tokens = torch.where(torch.from_numpy(race).to(self.device, non_blocking=True), drawn, tokens)
        if filtered.any():
            if tokens is None:
                tokens = torch.empty(len(slots), dtype=torch.int64, device=logits.device)
            # FlashInfer draws a batch from one random stream: only rows without a seed may take it.
            # Nor rows with min-p: masked before its top-k/top-p kernel, min-p drew far from
            # filtered_probs on the H200 (total variation 0.42-0.52, bench/kernel_check.py), so
            # those keep the sort path.
            by_kernel = (filtered & ~self.seeded[slots] & (self.min_p[slots] <= 0.0) if self._fi is not None
                         else np.zeros_like(filtered))
            for mask, draw in ((by_kernel, self._kernel_draw), (filtered & ~by_kernel, self._sort_draw)):
                if mask.any():
                    chosen = np.flatnonzero(mask)
                    idx = torch.from_numpy(chosen).to(self.device, non_blocking=True)
                    tokens[idx] = draw(logits[idx], slots[chosen], positions[chosen])
        assert tokens is not None  # every row is greedy, racing or filtered
        if len(rows):
            assert self._output_counts is not None
            self._output_counts.index_put_((s, tokens[r]), torch.ones(len(rows), dtype=torch.int32, device=self.device),
                                           accumulate=True)
        result = SampleResult(tokens)
        if top_n >= 0:
            logp = torch.log_softmax(raw, dim=-1, dtype=torch.float32)
            result.logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
            if top_n > 0:
                result.top_logprobs, result.top_ids = logp.topk(top_n, dim=-1)
        return result
