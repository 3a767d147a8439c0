"""Scheduler: the core that decides every step: waiting queue, chunked prefill, running batch, retraction.

Each call to `next_step` builds one Step, in this order:

1. decode rows for every running request whose prompt is fully scheduled (one
   token each, fed on the worker from the slot's last sampled token);
2. the next chunk of each request still prefilling, within `max_prefill_tokens`;
3. new admissions from the waiting queue (fcfs or longest-prefix-match first),
   reusing the longest cached prefix from the radix index, while the token
   budget, the slots and the KV pages last.

With `decode_steps` k > 1 (multi-step decode) a step with nothing to prefill or admit
asks the worker for up to k decode passes at once, each row's pages for all of them
sent up front. k never exceeds any decoding request's outputs left, so max_tokens
ends a block exactly; a stop inside one is seen when the block's k tokens come back,
and what was sampled after it is dropped, as with any finish seen late.

KV pages are taken optimistically: a request is admitted when its prompt fits in
free + evictable pages beside what the running requests take in the next
page_size steps, not its whole max_tokens. When a running request needs a page and none is left, the
scheduler retracts the NEWEST admitted request that has no row in this step yet
(possibly the one asking): the oldest requests keep going, so the queue drains
in arrival order and the oldest request always progresses (it fits the pool
alone, which add_request guarantees), so nothing deadlocks or starves. The
retracted request's computed full pages go into the radix index, so its redo is
mostly a cache hit, and it goes back to the front of the queue to be re-prefilled
from prompt + outputs so far.

With overlap, the servicer asks for step N+1 (and with a deeper pipeline N+2, ...)
before step N's output is known, so nothing here needs the tokens of steps in
flight: a request whose last prompt chunk is in flight already decodes (the worker
feeds the sampled token), decode rows never exceed max_tokens (scheduled outputs
are counted), a request's finish is seen as many steps late as were in flight and
the tokens sampled after it are dropped, and a retracted
request is re-admitted only once its in-flight outputs are back. Pages and slots
freed now may be reused by the very next step: the worker runs steps in order.
(services/scheduler/pipeline.py holds the rules of that loop.)

Which page belongs to whom (free, the radix index, a running request) is KVPages'
bookkeeping (kv_pages.py); this class decides who gets pages and when.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from llmrpc.engine.step import SlotParams, Step
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.invariants import check_kv_invariants
from llmrpc.services.scheduler.kv_pages import KVPages
from llmrpc.services.scheduler.metrics import SchedulerMetrics
from llmrpc.services.scheduler.request import (AdmissionError, Request, RequestState, TokenEvent, TokenLogprobs,
                                               merge_by_request)

# Longest-prefix-match needs one radix lookup per waiting request per step; past
# this queue length it costs more than it saves and admission falls back to fcfs.
LPM_MAX_QUEUE = 128


class _StepBuilder:
    """Accumulates one Step's rows: decode rows first, then prefill chunks."""

    __slots__ = ("slots", "starts", "page_counts", "page_ids", "chunk_lens", "chunk_tokens",
                 "sample_chunks", "admissions", "sampled", "chunked", "num_decode")

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.starts: list[int] = []
        self.page_counts: list[int] = []
        self.page_ids: list[int] = []
        self.chunk_lens: list[int] = []
        self.chunk_tokens: list[int] = []
        self.sample_chunks: list[bool] = []
        self.admissions: list[SlotParams] = []
        self.sampled: list[Request] = []  # the request behind each sampled token, in row order
        self.chunked: list[Request] = []  # requests that got a prefill chunk
        self.num_decode = 0

    def add_decode(self, req: Request, new_pages: list[int]) -> None:
        self.slots.append(req.slot)
        self.starts.append(req.num_fed)
        self.page_counts.append(len(new_pages))
        self.page_ids.extend(new_pages)
        self.sampled.append(req)
        self.num_decode += 1

    def add_chunk(self, req: Request, start: int, tokens: list[int], sample: bool, pages: list[int]) -> None:
        self.slots.append(req.slot)
        self.starts.append(start)
        self.page_counts.append(len(pages))
        self.page_ids.extend(pages)
        self.chunk_lens.append(len(tokens))
        self.chunk_tokens.extend(tokens)
        self.sample_chunks.append(sample)
        self.chunked.append(req)
        if sample:
            self.sampled.append(req)

    @property
    def empty(self) -> bool:
        return not self.slots

    def build(self, step_id: int, decode_steps: int) -> Step:
        i32 = np.int32
        return Step(
            step_id=step_id,
            num_decode=self.num_decode,
            slots=np.array(self.slots, dtype=i32),
            starts=np.array(self.starts, dtype=i32),
            chunk_lens=np.array(self.chunk_lens, dtype=i32),
            chunk_tokens=np.array(self.chunk_tokens, dtype=i32),
            sample_chunks=np.array(self.sample_chunks, dtype=bool),
            page_counts=np.array(self.page_counts, dtype=i32),
            page_ids=np.array(self.page_ids, dtype=i32),
            admissions=self.admissions,
            decode_steps=decode_steps,
        )


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.metrics = SchedulerMetrics()
        self._eos = frozenset(config.eos_token_ids)
        self._next_step_id = 0
        self._reset()

    def _reset(self) -> None:
        c = self.config
        self.kv = KVPages(c.num_pages, c.page_size, self.metrics, c.prefix_cache)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # every request not yet finished
        self._free_slots = list(range(c.max_slots - 1, -1, -1))
        # step id -> (the request behind each sampled token, the step's decode passes)
        self._in_flight: dict[int, tuple[list[Request], int]] = {}

    # ---- the servicer's interface ---------------------------------------------

    def add_request(self, req: Request) -> None:
        c = self.config
        if req.request_id in self.requests:
            raise AdmissionError("request_id", f"{req.request_id!r} is already in use")
        if req.state is not RequestState.WAITING or req.num_outputs:
            raise AdmissionError("request", "a request can be added only once")
        if not req.prompt:
            raise AdmissionError("prompt", "must not be empty")
        if req.max_tokens < 1:
            raise AdmissionError("max_tokens", f"must be >= 1, got {req.max_tokens}")
        if req.num_prompt + req.max_tokens > c.context_length:
            raise AdmissionError(
                "max_tokens", f"prompt ({req.num_prompt} tokens) + max_tokens ({req.max_tokens}) "
                f"exceeds the context length ({c.context_length})")
        pages = self.kv.pages_for(req.max_kv_tokens)
        if pages > c.num_pages:
            raise AdmissionError(
                "max_tokens", f"prompt ({req.num_prompt} tokens) + max_tokens ({req.max_tokens}) needs "
                f"{pages} KV pages, the pool has {c.num_pages} of {c.page_size} tokens")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.metrics.requests_added += 1

    def add_requests(self, reqs: Sequence[Request]) -> None:
        """Adds requests that stand or fall together (a request's n completions): when one is
        refused, the ones added before it are taken out again and the AdmissionError raised."""
        added: list[Request] = []
        try:
            for req in reqs:
                self.add_request(req)
                added.append(req)
        except AdmissionError:
            for req in added:
                self.abort(req.request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Ends the request now and frees its pages; tokens still in flight for it are dropped."""
        req = self.requests.get(request_id)
        if req is None:
            return
        self._finish(req, "abort")
        if self.config.check_invariants:
            self.check_invariants()

    def next_step(self) -> Step | None:
        if self.config.check_invariants and not self.config.overlap and self._in_flight:
            raise AssertionError(f"overlap is off but steps {sorted(self._in_flight)} are still in flight")
        b = _StepBuilder()
        k = self._decode_passes()
        self._schedule_decodes(b, k)
        budget = self.config.max_prefill_tokens
        if k == 1:
            budget = self._admit(b, self._schedule_prefill_chunks(b, budget))
        step = None
        if not b.empty:
            for req in b.chunked:
                if req.state is RequestState.RUNNING:
                    self.kv.share_prompt_pages(req)
            step_id = self._next_step_id
            self._next_step_id += 1
            self._in_flight[step_id] = (b.sampled * k, k)
            m = self.metrics
            m.steps += 1
            m.decode_tokens += b.num_decode * k
            m.multi_step_decodes += k > 1
            m.prefill_tokens += self.config.max_prefill_tokens - budget
            step = b.build(step_id, k)
        if self.config.check_invariants:
            self.check_invariants()
        return step

    def on_step_output(self, step_id: int, tokens: np.ndarray, logprobs: np.ndarray | None = None,
                       top_ids: np.ndarray | None = None,
                       top_logprobs: np.ndarray | None = None) -> list[TokenEvent]:
        """Hands each sampled token (and its logprobs, for requests that asked) to its request.

        Results must come in step order. `logprobs` is parallel to `tokens`; `top_ids` and
        `top_logprobs` have the batch's largest N columns, cut here to each request's own N.
        """
        in_flight = self._in_flight.pop(step_id, None)
        if in_flight is None:
            return []  # a step from before fail_all
        rows, passes = in_flight
        if self._in_flight and min(self._in_flight) < step_id:
            raise ValueError(f"step {step_id}'s output came before step {min(self._in_flight)}'s")
        ids = tokens.tolist()
        if len(ids) != len(rows):
            raise ValueError(f"step {step_id} sampled {len(rows)} tokens, the worker returned {len(ids)}")
        lps = logprobs.tolist() if logprobs is not None else None
        tops = top_ids.tolist() if top_ids is not None else None
        top_lps = top_logprobs.tolist() if top_logprobs is not None else None
        events: list[TokenEvent] = []
        eos, context_length = self._eos, self.config.context_length
        for row, (req, token) in enumerate(zip(rows, ids)):
            req.num_pending -= 1
            if req.finish_reason is not None:
                self.metrics.dropped_tokens += 1  # sampled after the request ended (finish checks lag a step)
                continue
            seq = req.tokens
            seq.append(token)
            num_prompt = len(req.prompt)
            num_outputs = len(seq) - num_prompt
            reason = None
            if num_outputs >= req.min_tokens and (
                    token in req.stop_token_ids or (not req.ignore_eos and token in eos)):
                reason = "stop"
            elif num_outputs >= req.max_tokens or len(seq) >= context_length:
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
            token_logprobs = None
            top_n = req.sampling.logprobs
            if top_n >= 0:
                top_ids_row: list[int] = []
                top_lps_row: list[float] = []
                if top_n > 0 and tops is not None and top_lps is not None and len(tops[row]) >= top_n:
                    top_ids_row, top_lps_row = tops[row][:top_n], top_lps[row][:top_n]
                if lps is None or len(top_ids_row) < top_n:
                    raise ValueError(f"step {step_id}: {req.request_id} asked for logprobs={top_n}, "
                                     "the worker returned fewer")
                token_logprobs = [TokenLogprobs(lps[row], top_ids_row, top_lps_row)]
            events.append(TokenEvent(req.request_id, [token], reason,
                                     (num_prompt, num_outputs, req.cached_prompt_tokens), token_logprobs))
        if passes > 1:  # a request's k tokens go out as one event
            events = merge_by_request(events)
        if self.config.check_invariants:
            self.check_invariants()
        return events

    def fail_all(self) -> list[TokenEvent]:
        """The worker is lost: every request ends with "error" and all state (KV included) starts empty."""
        events = []
        for req in self.requests.values():
            req.finish_reason = "error"
            req.state = RequestState.FINISHED
            events.append(TokenEvent(req.request_id, [], "error", req.usage))
        finished = self.metrics.requests_finished
        finished["error"] = finished.get("error", 0) + len(events)
        self._reset()
        return events

    def flush_cache(self) -> bool:
        """Evicts every cached page; only when nothing runs or is in flight (returns whether it did)."""
        if self.running or self._in_flight:
            return False
        self.kv.evict_all()
        return True

    # ---- gauges and counters ---------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_free_pages(self) -> int:
        return self.kv.pool.num_free

    @property
    def num_cached_pages(self) -> int:
        return self.kv.radix.num_pages

    @property
    def kv_usage(self) -> float:
        """Fraction of KV pages not free (running requests plus the prefix cache)."""
        return 1.0 - self.num_free_pages / self.config.num_pages

    @property
    def num_used_pages(self) -> int:
        """Pages no allocation can take now: held by requests, or cached under a request's lock."""
        return self.config.num_pages - self.kv.available

    @property
    def kv_cache_usage(self) -> float:
        """KV usage as vLLM and SGLang count it: cached pages no request holds are free to take,
        so a warm prefix cache does not look like a full pool to a router's KV scorer."""
        return self.num_used_pages / self.config.num_pages

    def check_invariants(self) -> None:
        check_kv_invariants(self.kv, self.running, self._free_slots, self.config.max_slots)
        for req in self.waiting:
            assert req.state is RequestState.WAITING and req.slot == -1 and not req.pages, (
                f"waiting request {req.request_id} still holds a slot or pages")
        assert len(self.waiting) + len(self.running) == len(self.requests), (
            "a live request is neither waiting nor running")

    # ---- building a step -------------------------------------------------------

    def _decode_passes(self) -> int:
        """k, the decode passes of the next step (multi-step decode, `decode_steps`): more than one only
        when no prompt is prefilling and no waiting request could take a free slot, and never more
        than any decoding request's outputs left (so no row is fed past its max_tokens)."""
        k = self.config.decode_steps
        if k == 1 or (self.waiting and self._free_slots):
            return 1
        for req in self.running:
            if req.num_fed < req.fill_len:
                return 1
            left = req.max_tokens - req.num_scheduled
            if left > 0:  # 0: every output it may have is scheduled; it sits this step out
                k = min(k, left)
        return k

    def _schedule_decodes(self, b: _StepBuilder, k: int) -> None:
        """A row for every decoding request, with the pages for its next k positions."""
        pages_for = self.kv.pages_for
        running = self.running
        i = 0
        while i < len(running):
            req = running[i]
            i += 1
            if req.num_fed < req.fill_len or req.num_scheduled >= req.max_tokens:
                continue  # still prefilling, or every output it may have is already scheduled
            new_pages: list[int] = []
            need = pages_for(req.num_fed + k) - len(req.pages)
            if need > 0:  # the tokens reach a new page
                if not self._make_room(need, req, prefill_phase=False):
                    continue  # req itself was retracted
                new_pages = self.kv.grow(req, req.num_fed + k)
            b.add_decode(req, new_pages)
            req.num_fed += k
            req.num_scheduled += k
            req.num_pending += k

    def _schedule_prefill_chunks(self, b: _StepBuilder, budget: int) -> int:
        """Next chunk of every running request still prefilling (oldest first); returns the budget left."""
        ps = self.config.page_size
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            if req.num_fed >= req.fill_len:
                i += 1
                continue
            room = (len(req.pages) + self.kv.available) * ps - req.num_fed
            chunk = min(req.fill_len - req.num_fed, budget, room)
            if chunk <= 0:
                self._make_room(1, req, prefill_phase=True)
                continue  # retry with the room made, or move past req if it was retracted
            self._add_chunk(b, req, chunk, self.kv.grow(req, req.num_fed + chunk))
            budget -= chunk
            i += 1
        return budget

    def _admit(self, b: _StepBuilder, budget: int) -> int:
        if budget <= 0 or not self.waiting or not self._free_slots:
            return budget
        kv = self.kv
        fcfs = self.config.schedule_policy == "fcfs" or len(self.waiting) > LPM_MAX_QUEUE
        reserved = self._reserved_pages()
        for req in self._admission_order(fcfs):
            if budget <= 0 or not self._free_slots:
                break
            if req.num_pending:  # retracted with outputs still in flight: its prompt is not known yet
                if fcfs:
                    break
                continue
            # Keep at least one token to compute: the last position must be run to sample from.
            prefix_pages, node = kv.match(req.tokens[:-1])
            if self._prefix_coming(req, len(prefix_pages), b):
                if fcfs:
                    break
                continue
            need = kv.pages_for(len(req.tokens)) - len(prefix_pages)
            if not kv.claim_prefix(req, prefix_pages, node, need + reserved):
                break
            self.waiting.remove(req)
            self._start(req)
            b.admissions.append(req.slot_params(req.slot))
            chunk = min(req.fill_len - req.num_fed, budget)
            new_pages = kv.grow(req, req.num_fed + chunk)
            # The worker's page table for the slot starts empty: send the cached prefix too.
            self._add_chunk(b, req, chunk, req.pages)
            reserved += need - len(new_pages)
            budget -= chunk
        return budget

    def _prefix_coming(self, req: Request, cached_pages: int, b: _StepBuilder) -> bool:
        """Whether a request prefilling now will cache req's next prompt page: then req waits a step.

        This is how n > 1 siblings (and any identical prompts arriving together) prefill
        their prompt once: the first is admitted, the rest wait until its pages are in the
        radix index. Pages written in this very step cannot be shared by it (a step's rows
        see only KV written by earlier steps), hence the wait. The prefilling request always
        progresses, so the wait ends.
        """
        if not self.kv.prefix_cache:  # nothing will be shared: waiting would gain nothing
            return False
        ps = self.config.page_size
        lo, hi = cached_pages * ps, (cached_pages + 1) * ps
        if hi > len(req.tokens) - 1:  # the last token is always computed: no full page left to share
            return False
        page = req.tokens[lo:hi]
        for r in itertools.chain(b.chunked, self.running):
            if ((r.num_fed < r.fill_len or r in b.chunked) and r.fill_len >= hi
                    and r.tokens[lo:hi] == page and r.tokens[:lo] == req.tokens[:lo]):
                return True
        return False

    def _reserved_pages(self) -> int:
        """Pages the running requests will soon take: the rest of each prompt being prefilled,
        and what each decoding request needs for its next page_size tokens (capped by
        max_tokens), so an admission does not force a retraction a few steps later."""
        ps, pages_for = self.config.page_size, self.kv.pages_for
        reserved = 0
        for r in self.running:
            if r.num_fed < r.fill_len:
                reserved += pages_for(r.fill_len) - len(r.pages)
            else:
                upcoming = min(ps, r.max_tokens - r.num_scheduled)
                reserved += max(0, pages_for(r.num_fed + upcoming) - len(r.pages))
        return reserved

    def _admission_order(self, fcfs: bool) -> Iterator[Request]:
        if fcfs:
            while self.waiting:  # the loop either admits the head or stops
                yield self.waiting[0]
        else:
            match_len = self.kv.match_len
            yield from sorted(self.waiting, key=lambda r: -match_len(r.tokens))

    def _start(self, req: Request) -> None:
        """req, its page table started on the cached prefix (KVPages.claim_prefix), takes a slot."""
        req.state = RequestState.RUNNING
        req.slot = self._free_slots.pop()
        req.fill_len = len(req.tokens)
        req.num_fed = len(req.pages) * self.config.page_size
        req.num_scheduled = req.num_outputs
        if req.cached_prompt_tokens < 0:  # first admission: the hit the client is told about
            req.cached_prompt_tokens = req.num_fed
            self.metrics.prompt_tokens += req.num_prompt
            self.metrics.cached_prompt_tokens += req.num_fed
        self.running.append(req)

    def _add_chunk(self, b: _StepBuilder, req: Request, chunk: int, pages: list[int]) -> None:
        start = req.num_fed
        sample = start + chunk == req.fill_len  # only the chunk that ends the prompt samples
        b.add_chunk(req, start, req.tokens[start:start + chunk], sample, pages)
        req.num_fed += chunk
        if sample:
            req.num_scheduled += 1
            req.num_pending += 1

    # ---- retraction and finishing -----------------------------------------------

    def _make_room(self, n: int, req: Request, prefill_phase: bool) -> bool:
        """Makes n pages allocatable by retracting the newest requests without a row in this step.

        Returns False when req itself had to be retracted.
        """
        while self.kv.available < n:
            if prefill_phase:  # decode rows are built already; only prefills at or after req have none
                victim = next(r for r in reversed(self.running) if r.num_fed < r.fill_len)
            else:  # rows go oldest first, so everything from req on has none
                victim = self.running[-1]
            self._retract(victim)
            if victim is req:
                return False
        return True

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.state = RequestState.WAITING
        self.waiting.appendleft(req)
        self.metrics.retractions += 1

    def _release(self, req: Request) -> None:
        """Gives back req's pages (its computed full pages go into the radix index) and its slot."""
        self.kv.release(req)
        self._free_slots.append(req.slot)
        req.slot = -1
        req.num_fed = 0
        req.fill_len = 0

    def _finish(self, req: Request, reason: str) -> None:
        if req.state is RequestState.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.state is RequestState.WAITING:
            self.waiting.remove(req)
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        finished = self.metrics.requests_finished
        finished[reason] = finished.get(reason, 0) + 1
