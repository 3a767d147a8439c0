"""The unit of work a worker executes: one forward pass over a batch of rows.

The scheduler builds a Step, services/protocol.py packs it into a StepCommand,
and the worker unpacks it and hands it to the engine's ModelRunner. Rows are the
decode rows first (one token each, fed from the slot's last sampled token, which
stays on the device), then prefill chunks (their tokens travel in the step).

A step of decode rows only may ask for k = `decode_steps` forward passes back to back
(multi-step decode): each row's pages then cover its k new positions, and the output
holds k tokens per row, step-major (the B tokens of the first pass, then the second's).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from llmrpc.engine.constraint import Constraint

GREEDY = 0.0


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """A request's sampling facts, as the scheduler keeps them from admission to finish."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int = -1  # -1: none; 0: the sampled token's; N: plus top-N
    constraint: Constraint | None = None  # the grammar every output token keeps to (engine/constraint.py)

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class SlotParams(Sampling):
    """Per-request sampling facts, sent once when a request takes a slot."""

    slot: int
    prompt_tokens: tuple[int, ...] = ()  # only sent when a penalty needs the prompt
    # The outputs a request already has when it takes the slot again (a retraction's recompute),
    # only sent when its matcher (or a penalty's history) must replay them.
    output_tokens: tuple[int, ...] = ()

    @classmethod
    def of(cls, sampling: Sampling, slot: int, prompt_tokens: tuple[int, ...] = (),
           output_tokens: tuple[int, ...] = ()) -> SlotParams:
        facts = {f.name: getattr(sampling, f.name) for f in fields(Sampling)}
        return cls(slot, prompt_tokens=prompt_tokens, output_tokens=output_tokens, **facts)


def _i32(values: object = ()) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


@dataclass
class Step:
    """One batch. Arrays are int32 (sample_chunks is bool); see the module docstring."""

    step_id: int
    num_decode: int = 0
    slots: np.ndarray = field(default_factory=_i32)  # [B]
    starts: np.ndarray = field(default_factory=_i32)  # [B] position of each row's first new token
    chunk_lens: np.ndarray = field(default_factory=_i32)  # [B - num_decode]
    chunk_tokens: np.ndarray = field(default_factory=_i32)  # [sum(chunk_lens)]
    sample_chunks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [B - num_decode]
    page_counts: np.ndarray = field(default_factory=_i32)  # [B] pages appended to each row's slot
    page_ids: np.ndarray = field(default_factory=_i32)  # [sum(page_counts)]
    admissions: list[SlotParams] = field(default_factory=list)
    decode_steps: int = 1  # k forward passes back to back; > 1 only when every row decodes

    @property
    def num_rows(self) -> int:
        return int(len(self.slots))

    @property
    def num_prefill(self) -> int:
        return self.num_rows - self.num_decode

    @property
    def num_sampled(self) -> int:
        """Tokens the step returns: every decode row (k times) plus chunks that end their prompt."""
        return self.num_decode * self.decode_steps + int(self.sample_chunks.sum())

    @property
    def num_tokens(self) -> int:
        return self.num_decode * self.decode_steps + int(self.chunk_lens.sum())

    def decode_pass(self, i: int) -> Step:
        """Pass i of a multi-step decode as a one-pass step: positions i further on, its pages and
        admissions already applied by pass 0."""
        if i == 0:
            return replace(self, decode_steps=1)
        return Step(self.step_id, num_decode=self.num_decode, slots=self.slots, starts=self.starts + i,
                    page_counts=np.zeros_like(self.page_counts))


@dataclass
class StepOutput:
    """What one step produced, in row order over the rows that sample (k passes: step-major)."""

    step_id: int
    tokens: np.ndarray  # int32[num_sampled]
    logprobs: np.ndarray | None = None  # float32[num_sampled]
    top_ids: np.ndarray | None = None  # int32[num_sampled, top_n]
    top_logprobs: np.ndarray | None = None  # float32[num_sampled, top_n]
