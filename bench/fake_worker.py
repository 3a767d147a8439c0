"""FakeWorker: executes Steps exactly as a worker rank does, on token ids instead of a model.

Its "model" (HashModel) maps a slot's whole token history to the next token. The
history is read back through the slot's page table from a fake KV store that
holds token ids instead of keys and values, so any page-accounting mistake by
the scheduler (a page reused while still referenced, a wrong or missing page id,
a cached prefix that is not what it claims) changes or breaks the output. With
`verify` on, every row is also checked against what the slot was fed since its
admission. A multi-step decode (`Step.decode_steps` = k) runs as k passes, each feeding
the token the one before sampled, with the pages for all k sent in the first. Used by the
scheduler tests and bench/scheduler_overhead.py, which drive it through
services/scheduler/pipeline.py's StepPipeline (`launch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from llmrpc.engine.step import Step, StepOutput

_MASK = (1 << 64) - 1


class HashModel:
    """next token = a 64-bit hash of (position, token) over the whole history, mod the vocabulary."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self._weights = self._rng.integers(1, 1 << 62, size=4096, dtype=np.uint64)

    def __call__(self, history: np.ndarray | list[int]) -> int:
        history = np.asarray(history, dtype=np.uint64)
        n = len(history)
        while n > len(self._weights):
            more = self._rng.integers(1, 1 << 62, size=len(self._weights), dtype=np.uint64)
            self._weights = np.concatenate([self._weights, more])
        h = int(((history + np.uint64(1)) * self._weights[:n]).sum()) ^ n
        h ^= h >> 31
        h = (h * 0x9E3779B97F4A7C15) & _MASK
        h ^= h >> 29
        return h % self.vocab_size


@dataclass(frozen=True)
class Generation:
    output_ids: list[int]
    finish_reason: str


def generate_alone(model: HashModel, prompt: Iterable[int], max_tokens: int, eos_token_ids: Iterable[int],
                   min_tokens: int = 0, ignore_eos: bool = False,
                   stop_token_ids: Iterable[int] = ()) -> Generation:
    """The reference: what a request must produce when it runs alone, by the same finish rules."""
    history = list(prompt)
    eos, stop = set(eos_token_ids), set(stop_token_ids)
    out: list[int] = []
    while True:
        token = model(history)
        history.append(token)
        out.append(token)
        if len(out) >= min_tokens and (token in stop or (not ignore_eos and token in eos)):
            return Generation(out, "stop")
        if len(out) >= max_tokens:
            return Generation(out, "length")


@dataclass(frozen=True)
class Executed:
    """A step the FakeWorker has already run: StepPipeline's pending output, ready at once."""

    output: StepOutput

    def result(self) -> StepOutput:
        return self.output


class FakeWorker:
    def __init__(self, num_pages: int, page_size: int, max_slots: int, model: HashModel,
                 verify: bool = True) -> None:
        self.page_size = page_size
        self.model = model
        self.verify = verify
        self.kv = np.full((num_pages, page_size), -1, dtype=np.int64)  # token id per KV position
        self.tables: list[list[int]] = [[] for _ in range(max_slots)]  # slot page tables
        self.last_token = [-1] * max_slots  # the device-side buffer decode rows feed from
        self.fed: list[list[int] | None] = [None] * max_slots  # verify: the slot's tokens since admission
        self.steps = 0
        self.passes = 0  # forward passes: steps plus the extra passes of multi-step decodes

    def launch(self, step: Step) -> Executed:
        """execute(), in the form StepPipeline launches a step."""
        return Executed(StepOutput(step.step_id, self.execute(step)))

    def execute(self, step: Step) -> np.ndarray:
        k = step.decode_steps
        assert k == 1 or step.num_prefill == 0, f"step {step.step_id}: {k} decode passes with prefill rows"
        out = np.concatenate([self._execute(step.decode_pass(i), passes_left=k - i) for i in range(k)])
        self.steps += 1
        return out

    def _execute(self, step: Step, passes_left: int) -> np.ndarray:
        """One pass; a decode row's pages must cover its positions in this pass and the passes left."""
        ps = self.page_size
        for params in step.admissions:  # an admission resets its slot
            self.tables[params.slot] = []
            self.last_token[params.slot] = -1
            self.fed[params.slot] = None
        slots, starts = step.slots.tolist(), step.starts.tolist()
        page_counts, page_ids = step.page_counts.tolist(), step.page_ids.tolist()
        chunk_lens, chunk_tokens = step.chunk_lens.tolist(), step.chunk_tokens.tolist()
        sample_chunks = step.sample_chunks.tolist()
        assert sum(page_counts) == len(page_ids) and sum(chunk_lens) == len(chunk_tokens)
        assert len(set(slots)) == len(slots), f"step {step.step_id} has two rows for one slot"
        # Like a model layer: every row stores its new KV first, then every row attends.
        rows = []
        page_at = token_at = 0
        for row, slot in enumerate(slots):
            table = self.tables[slot]
            table.extend(page_ids[page_at:page_at + page_counts[row]])
            page_at += page_counts[row]
            start = starts[row]
            if row < step.num_decode:
                new = [self.last_token[slot]]
                assert new[0] >= 0, f"step {step.step_id}: decode row on slot {slot}, which has sampled nothing"
                sample = True
            else:
                n = chunk_lens[row - step.num_decode]
                assert n >= 1, f"step {step.step_id}: empty prefill chunk on slot {slot}"
                new = chunk_tokens[token_at:token_at + n]
                token_at += n
                sample = sample_chunks[row - step.num_decode]
            end = start + len(new)
            reach = end + (passes_left - 1 if row < step.num_decode else 0)
            assert len(table) == -(-reach // ps), (
                f"step {step.step_id}: slot {slot} has {len(table)} pages for {reach} positions")
            pages = np.asarray(table, dtype=np.int64)
            if self.verify:
                seen = self.fed[slot]
                if seen is None:  # first row since admission: what precedes it is the cached prefix
                    prefix = self.kv[pages].reshape(-1)[:start]
                    assert (prefix >= 0).all(), f"step {step.step_id}: slot {slot}'s cached prefix has unwritten KV"
                    seen = self.fed[slot] = prefix.tolist()
                assert len(seen) == start, f"step {step.step_id}: slot {slot} row starts at {start}, slot holds {len(seen)}"
                seen.extend(new)
            positions = np.arange(start, end)
            self.kv[pages[positions // ps], positions % ps] = new
            rows.append((slot, pages, end, sample))
        out: list[int] = []
        for slot, pages, end, sample in rows:
            history = self.kv[pages].reshape(-1)[:end]
            if self.verify:
                assert history.tolist() == self.fed[slot], (
                    f"step {step.step_id}: slot {slot}'s KV pages no longer hold its tokens (a page was reused)")
            if sample:
                token = self.model(history)
                self.last_token[slot] = token
                out.append(token)
        self.passes += 1
        return np.asarray(out, dtype=np.int32)
