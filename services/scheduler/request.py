"""Request: one sequence the scheduler serves, its sampling facts and its runtime state.

Also the two small types the core hands back across its boundary: TokenEvent
(what a request produced in one step) and AdmissionError (a request that can
never be served).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from llmrpc.engine.step import Sampling, SlotParams

if TYPE_CHECKING:
    from llmrpc.services.contract import Limits
    from llmrpc.services.scheduler.radix import RadixNode


class AdmissionError(ValueError):
    """A request that can never be served: `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued (new, or retracted and to be recomputed)
    RUNNING = "running"  # holds a slot and KV pages; prefilling or decoding
    FINISHED = "finished"


class TokenEvent(NamedTuple):
    """What one request produced in one step (usually one token) and, on its last event, why it ended.

    A NamedTuple: one is built per running request per step, and tuples build fastest.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: str | None  # None | "stop" | "length" | "abort" | "error"
    usage: tuple[int, int, int]  # (prompt, completion, cached prompt) tokens
    # One row per token when the request asked for logprobs, else None:
    # (logprob of the sampled token, top-N ids, top-N logprobs), N = the request's own.
    logprobs: list[TokenLogprobs] | None = None


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """One request's events as one: every token in order, the last event's finish and usage."""
    last = events[-1]
    logprobs = None if last.logprobs is None else [row for e in events for row in (e.logprobs or ())]
    return last._replace(token_ids=[t for e in events for t in e.token_ids], logprobs=logprobs)


def merge_by_request(events: list[TokenEvent]) -> list[TokenEvent]:
    """Each request's events merged into one, in the order the requests first appear."""
    by_request: dict[str, list[TokenEvent]] = {}
    for event in events:
        by_request.setdefault(event.request_id, []).append(event)
    return [merge_events(group) for group in by_request.values()]


class TokenLogprobs(NamedTuple):
    """The sampled token's logprob and the request's top-N alternatives (most likely first)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt: tuple[int, ...]
    sampling: Sampling = Sampling()
    max_tokens: int = 128
    min_tokens: int = 0  # EOS and stop tokens do not end the request before this many outputs
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()

    # ---- runtime state, owned by the Scheduler ----
    state: RequestState = field(default=RequestState.WAITING, init=False)
    tokens: list[int] = field(init=False)  # prompt + outputs known so far
    slot: int = field(default=-1, init=False)
    pages: list[int] = field(default_factory=list, init=False)  # the slot's page table, in position order
    num_cached_pages: int = field(default=0, init=False)  # leading pages held by the radix index
    radix_node: RadixNode | None = field(default=None, init=False)  # the radix node locking those pages
    fill_len: int = field(default=0, init=False)  # tokens to prefill in this admission (prompt + outputs so far)
    num_fed: int = field(default=0, init=False)  # positions whose KV is written or scheduled to be
    num_scheduled: int = field(default=0, init=False)  # outputs produced or scheduled to be produced
    num_pending: int = field(default=0, init=False)  # outputs scheduled in steps whose result is not back
    cached_prompt_tokens: int = field(default=-1, init=False)  # prefix-cache hit at the first admission
    finish_reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.prompt = tuple(self.prompt)
        self.stop_token_ids = frozenset(self.stop_token_ids)
        self.tokens = list(self.prompt)

    @classmethod
    def of(cls, request_id: str, prompt: tuple[int, ...], sampling: Sampling, limits: Limits) -> Request:
        """One completion of a checked request (services/scheduler/validation.py makes `limits.n` of them)."""
        return cls(request_id, prompt, sampling, max_tokens=limits.max_tokens, min_tokens=limits.min_tokens,
                   ignore_eos=limits.ignore_eos, stop_token_ids=frozenset(limits.stop_token_ids))

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)

    @property
    def num_outputs(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def usage(self) -> tuple[int, int, int]:
        return (len(self.prompt), len(self.tokens) - len(self.prompt), max(self.cached_prompt_tokens, 0))

    @property
    def max_kv_tokens(self) -> int:
        """Positions whose KV this request can ever need: the last sampled token is never fed."""
        return len(self.prompt) + self.max_tokens - 1

    def slot_params(self, slot: int) -> SlotParams:
        # The original prompt, so the worker can tell prompt from output even after a
        # retraction re-prefills prompt + outputs so far; and those outputs, which a grammar
        # matcher (or a penalty's counts) must see again.
        penalized = self.sampling.uses_penalties
        prompt = self.prompt if penalized else ()
        outputs = tuple(self.output_ids) if penalized or self.sampling.constraint is not None else ()
        return SlotParams.of(self.sampling, slot, prompt, outputs)
