"""The scheduler core driven like the servicer drives it, against a FakeWorker that checks every page.

Every test runs with check_invariants on, so the page accounting is verified
after every step, output and abort.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest

from llmrpc.bench.fake_worker import FakeWorker, HashModel, generate_alone
from llmrpc.engine.step import Step
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.pipeline import StepPipeline
from llmrpc.services.scheduler.request import AdmissionError, Request, TokenEvent
from llmrpc.services.scheduler.scheduler import Scheduler

EOS = 0


def make(num_pages: int, page_size: int, max_slots: int, context_length: int = 4096, vocab: int = 48,
         **kw) -> tuple[Scheduler, FakeWorker]:
    config = SchedulerConfig(num_pages=num_pages, page_size=page_size, max_slots=max_slots,
                             context_length=context_length, eos_token_ids=(EOS,), check_invariants=True, **kw)
    return Scheduler(config), FakeWorker(num_pages, page_size, max_slots, HashModel(vocab))


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    finish: dict[str, str] = field(default_factory=dict)
    usage: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)


class Ticking:
    """The core as the pipeline sees it, with arrivals before and aborts after each next_step (a tick).

    Aborts land after a step is built and before it is sent, with up to depth + 1 steps in
    flight, as they can in the servicer.
    """

    def __init__(self, sched: Scheduler, arrivals: dict[int, list[Request]], aborts: dict[int, list[str]],
                 run: Run) -> None:
        self.sched, self.arrivals, self.aborts, self.run = sched, arrivals, aborts, run
        self.tick = 0

    def next_step(self) -> Step | None:
        for req in self.arrivals.pop(self.tick, []):
            self.sched.add_request(req)
        step = self.sched.next_step()
        for rid in self.aborts.pop(self.tick, []):
            if rid not in self.run.finish:
                self.sched.abort(rid)
                self.run.finish[rid] = "abort"
        self.tick += 1
        return step

    def on_step_output(self, *args) -> list[TokenEvent]:
        return self.sched.on_step_output(*args)


def simulate(sched: Scheduler, worker: FakeWorker, arrivals: dict[int, list[Request]], depth: int,
             aborts: dict[int, list[str]] | None = None) -> Run:
    """Drives the core through the servicer's pipeline: up to `depth` steps beyond the oldest unread output."""
    assert depth == 0 or sched.config.overlap, "steps in flight need overlap in the core"
    arrivals = {t: list(reqs) for t, reqs in arrivals.items()}
    aborts = {t: list(ids) for t, ids in (aborts or {}).items()}
    run = Run()
    pipeline = StepPipeline(Ticking(sched, arrivals, aborts, run), worker.launch, depth)
    while True:
        for events in pipeline.run():
            for ev in events:
                assert ev.request_id not in run.finish, f"event for {ev.request_id} after it ended"
                run.tokens[ev.request_id].extend(ev.token_ids)
                if ev.finish_reason is not None:
                    run.finish[ev.request_id] = ev.finish_reason
                    run.usage[ev.request_id] = ev.usage
                    run.finish_order.append(ev.request_id)
        if not arrivals and not aborts:  # idle with nothing more to come; else the ticks go on
            return run


def random_requests(rng: np.random.Generator, n: int, vocab: int, max_arrival: int) -> dict[int, list[Request]]:
    prefixes = [[], rng.integers(1, vocab, 8).tolist(), rng.integers(1, vocab, 13).tolist(),
                rng.integers(1, vocab, 24).tolist()]
    arrivals: dict[int, list[Request]] = defaultdict(list)
    for i in range(n):
        prompt = prefixes[rng.integers(len(prefixes))] + rng.integers(0, vocab, rng.integers(1, 25)).tolist()
        max_tokens = int(rng.integers(1, 40))
        req = Request(
            f"r{i}", prompt, max_tokens=max_tokens,
            min_tokens=int(rng.integers(0, max_tokens)) if rng.random() < 0.2 else 0,
            ignore_eos=bool(rng.random() < 0.2),
            stop_token_ids=[int(rng.integers(vocab))] if rng.random() < 0.3 else [],
        )
        arrivals[int(rng.integers(max_arrival))].append(req)
    return arrivals


def expected(worker: FakeWorker, req: Request):
    return generate_alone(worker.model, req.prompt, req.max_tokens, (EOS,), req.min_tokens, req.ignore_eos,
                          req.stop_token_ids)


def all_requests(arrivals: dict[int, list[Request]]) -> list[Request]:
    return [r for reqs in arrivals.values() for r in reqs]


def assert_no_leaks(sched: Scheduler) -> None:
    assert sched.num_running == sched.num_waiting == sched.num_in_flight == 0
    assert sched.num_free_pages + sched.num_cached_pages == sched.config.num_pages
    assert sched.flush_cache()
    assert sched.num_free_pages == sched.config.num_pages and sched.num_cached_pages == 0


# ---- 200 requests through a pool 4x too small ---------------------------------

# 16 slots of requests needing ~11 pages each on average want ~176 pages; the pool has 44
# (the largest request, 48 prompt + 39 new tokens, needs 22).
SMALL_POOL = dict(num_pages=44, page_size=4, max_slots=16, max_prefill_tokens=24)
# (steps in flight beyond the oldest unread output, the most decode passes per step): none, the
# default one and a deep pipeline; then multi-step decode, with and without overlap.
DEPTHS = [(0, 1), (1, 1), (3, 1), (1, 4), (0, 3), (2, 3)]
DEPTH_IDS = ["no-overlap", "overlap", "depth-3", "overlap-4-passes", "no-overlap-3-passes", "depth-2-3-passes"]


@pytest.mark.parametrize("depth,passes", DEPTHS, ids=DEPTH_IDS)
def test_200_requests_through_a_small_pool_match_their_outputs_alone(depth: int, passes: int) -> None:
    sched, worker = make(**SMALL_POOL, overlap=depth > 0, decode_steps=passes)
    arrivals = random_requests(np.random.default_rng(1), 200, vocab=48, max_arrival=150)
    run = simulate(sched, worker, arrivals, depth)
    for req in all_requests(arrivals):
        ref = expected(worker, req)
        assert run.tokens[req.request_id] == ref.output_ids, req.request_id
        assert run.finish[req.request_id] == ref.finish_reason, req.request_id
        prompt, completion, cached = run.usage[req.request_id]
        assert (prompt, completion) == (len(req.prompt), len(ref.output_ids))
        assert cached % 4 == 0 and cached < prompt
    m = sched.metrics
    assert m.retractions > 0 and m.evicted_pages > 0 and m.cached_prompt_tokens > 0
    assert m.requests_finished.get("stop", 0) + m.requests_finished.get("length", 0) == 200
    # Decode rows are never scheduled past max_tokens; only a stop seen late wastes tokens: the rest of
    # its step's passes and the `depth` steps behind it.
    assert m.dropped_tokens <= m.requests_finished.get("stop", 0) * ((depth + 1) * passes - 1)
    assert (worker.passes > worker.steps) == (passes > 1)  # multi-step decodes ran (and only when asked)
    assert_no_leaks(sched)


@pytest.mark.parametrize("depth,passes", DEPTHS, ids=DEPTH_IDS)
def test_aborts_at_random_points_leak_no_pages(depth: int, passes: int) -> None:
    rng = np.random.default_rng(2)
    sched, worker = make(**SMALL_POOL, overlap=depth > 0, decode_steps=passes)
    arrivals = random_requests(rng, 120, vocab=48, max_arrival=150)
    aborts: dict[int, list[str]] = defaultdict(list)
    aborted = set()
    for t, reqs in arrivals.items():
        for req in reqs:
            if rng.random() < 0.3:
                aborts[t + int(rng.integers(0, 40))].append(req.request_id)
                aborted.add(req.request_id)
    aborts[0].append("never-added")  # aborting an unknown id is a no-op
    run = simulate(sched, worker, arrivals, depth, aborts)
    really_aborted = {rid for rid, reason in run.finish.items() if reason == "abort"}
    assert really_aborted and really_aborted <= aborted | {"never-added"}
    for req in all_requests(arrivals):
        ref = expected(worker, req)
        got = run.tokens[req.request_id]
        if req.request_id in really_aborted:
            assert got == ref.output_ids[: len(got)]  # what it sent before the abort was right
        else:
            assert (got, run.finish[req.request_id]) == (ref.output_ids, ref.finish_reason)
    assert_no_leaks(sched)


# ---- prefix caching -------------------------------------------------------------

@pytest.mark.parametrize("arrive", [1, 40], ids=["while-first-runs", "after-first-ends"])
def test_a_2000_token_shared_prefix_is_computed_once(arrive: int) -> None:
    rng = np.random.default_rng(3)
    sched, worker = make(num_pages=1024, page_size=16, max_slots=8, vocab=5000)
    prefix = rng.integers(1, 5000, 2000).tolist()
    reqs = [Request(f"q{i}", prefix + rng.integers(1, 5000, int(rng.integers(10, 30))).tolist(),
                    max_tokens=8, ignore_eos=True) for i in range(8)]
    run = simulate(sched, worker, {0: reqs[:1], arrive: reqs[1:]}, depth=1)
    assert run.usage["q0"][2] == 0
    for req in reqs:
        assert run.tokens[req.request_id] == expected(worker, req).output_ids
        if req.request_id != "q0":
            assert run.usage[req.request_id][2] == 2000  # the whole prefix: 125 full pages
    assert sched.metrics.prefill_tokens < 2000 + 8 * 50


@pytest.mark.parametrize("depth", [0, 1], ids=["no-overlap", "overlap"])
def test_with_the_prefix_cache_off_nothing_is_shared_and_every_page_comes_back(depth: int) -> None:
    rng = np.random.default_rng(3)
    sched, worker = make(num_pages=300, page_size=16, max_slots=8, vocab=5000, overlap=depth > 0,
                         prefix_cache=False)
    prefix = rng.integers(1, 5000, 500).tolist()
    reqs = [Request(f"q{i}", prefix + rng.integers(1, 5000, int(rng.integers(10, 30))).tolist(),
                    max_tokens=8, ignore_eos=True) for i in range(8)]
    run = simulate(sched, worker, {0: reqs[:1], 1: reqs[1:4], 40: reqs[4:]}, depth)
    for req in reqs:
        assert run.tokens[req.request_id] == expected(worker, req).output_ids
        assert run.usage[req.request_id][2] == 0  # no cached prompt tokens, ever
    assert sched.metrics.prefill_tokens == sum(len(r.prompt) for r in reqs)
    assert sched.num_cached_pages == 0 and sched.num_free_pages == sched.config.num_pages
    assert_no_leaks(sched)


def test_with_the_prefix_cache_off_retraction_recomputes_everything() -> None:
    sched, worker = make(**SMALL_POOL, prefix_cache=False)
    arrivals = random_requests(np.random.default_rng(1), 120, vocab=48, max_arrival=100)
    run = simulate(sched, worker, arrivals, depth=1)
    for req in all_requests(arrivals):
        ref = expected(worker, req)
        assert (run.tokens[req.request_id], run.finish[req.request_id]) == (ref.output_ids, ref.finish_reason)
        assert run.usage[req.request_id][2] == 0
    m = sched.metrics
    assert m.retractions > 0 and m.cached_prompt_tokens == 0 and m.evicted_pages == 0
    assert sched.num_cached_pages == 0
    assert_no_leaks(sched)


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_beside_decodes() -> None:
    sched, worker = make(num_pages=64, page_size=4, max_slots=4, max_prefill_tokens=16)
    short = Request("short", [5, 6, 7], max_tokens=12, ignore_eos=True)
    long = Request("long", list(range(1, 60)), max_tokens=3, ignore_eos=True)
    sched.add_request(short)
    first = sched.next_step()
    assert first is not None and first.num_decode == 0 and first.sample_chunks.tolist() == [True]
    sched.on_step_output(first.step_id, worker.execute(first))
    sched.add_request(long)
    shapes = []
    while (step := sched.next_step()) is not None:
        shapes.append((step.num_decode, step.chunk_lens.tolist(), step.sample_chunks.tolist()))
        sched.on_step_output(step.step_id, worker.execute(step))
    # Every step keeps the running decode going and adds at most 16 prompt tokens.
    assert shapes[:5] == [(1, [16], [False]), (1, [16], [False]), (1, [16], [False]), (1, [11], [True]),
                          (2, [], [])]


# ---- admission -----------------------------------------------------------------

def test_requests_that_can_never_fit_are_refused_at_admission() -> None:
    sched, _ = make(num_pages=4, page_size=4, max_slots=2, context_length=32)
    with pytest.raises(AdmissionError) as e:
        sched.add_request(Request("a", [], max_tokens=1))
    assert e.value.field == "prompt"
    with pytest.raises(AdmissionError) as e:
        sched.add_request(Request("a", [1] * 30, max_tokens=3))
    assert e.value.field == "max_tokens" and "context length (32)" in str(e.value)
    with pytest.raises(AdmissionError) as e:  # 16 prompt + 2 new: 17 KV positions, 5 pages > 4
        sched.add_request(Request("a", [1] * 16, max_tokens=2))
    assert "5 KV pages" in str(e.value)
    sched.add_request(Request("a", [1] * 16, max_tokens=1))  # 16 positions: exactly the pool
    with pytest.raises(AdmissionError) as e:
        sched.add_request(Request("a", [1], max_tokens=1))
    assert e.value.field == "request_id"


def test_requests_added_together_stand_or_fall_together() -> None:
    sched, _ = make(num_pages=4, page_size=4, max_slots=2, context_length=32)
    fits, too_long = Request("a#0", [1, 2], max_tokens=2), Request("a#1", [1] * 30, max_tokens=3)
    with pytest.raises(AdmissionError) as e:
        sched.add_requests([fits, too_long])
    assert e.value.field == "max_tokens"
    assert (sched.requests, sched.num_waiting, sched.next_step()) == ({}, 0, None)
    sched.add_requests([Request("b#0", [1, 2], max_tokens=2), Request("b#1", [1, 2], max_tokens=2)])
    assert sched.num_waiting == 2


def test_a_request_needing_the_whole_pool_runs_alone_after_the_others() -> None:
    sched, worker = make(num_pages=8, page_size=4, max_slots=4)
    big = Request("big", list(range(1, 21)), max_tokens=13, ignore_eos=True)  # 32 positions = 8 pages
    small = [Request(f"s{i}", [i + 1, 2, 3], max_tokens=10, ignore_eos=True) for i in range(3)]
    run = simulate(sched, worker, {0: small[:2], 1: [big], 2: small[2:]}, depth=1)
    for req in small + [big]:
        assert run.tokens[req.request_id] == expected(worker, req).output_ids
    assert run.finish_order.index("big") > run.finish_order.index("s0")
    assert_no_leaks(sched)


def test_lpm_admits_the_longest_cached_prefix_first_and_fcfs_keeps_arrival_order() -> None:
    shared = list(range(1, 17))
    for policy, first in (("fcfs", "other"), ("lpm", "sharing")):
        sched, worker = make(num_pages=32, page_size=4, max_slots=1, schedule_policy=policy)
        warm = Request("warm", shared + [20], max_tokens=2, ignore_eos=True)
        other = Request("other", [30, 31, 32, 33, 34], max_tokens=2, ignore_eos=True)
        sharing = Request("sharing", shared + [21, 22], max_tokens=2, ignore_eos=True)
        run = simulate(sched, worker, {0: [warm], 1: [other, sharing]}, depth=0)
        assert run.finish_order == ["warm", first, ({"other", "sharing"} - {first}).pop()], policy
        assert run.usage["sharing"][2] == 16


# ---- multi-step decode -----------------------------------------------------------

def drive(sched: Scheduler, worker: FakeWorker) -> tuple[list[tuple[int, int, int, list[int]]], list[TokenEvent]]:
    """Overlap off: every step's (decode rows, prefill rows, passes, pages sent) and its events."""
    shapes, events = [], []
    while (step := sched.next_step()) is not None:
        shapes.append((step.num_decode, step.num_prefill, step.decode_steps, step.page_counts.tolist()))
        events += sched.on_step_output(step.step_id, worker.execute(step))
    return shapes, events


def test_a_lone_request_decodes_k_tokens_a_step_and_never_past_max_tokens() -> None:
    sched, worker = make(num_pages=16, page_size=4, max_slots=2, decode_steps=4)
    req = Request("a", [1, 2, 3], max_tokens=10, ignore_eos=True)
    sched.add_request(req)
    shapes, events = drive(sched, worker)
    # The prefill samples output 1; passes of 4 write positions 3-6 and 7-10 (a new page each time);
    # one output is left, so the last step has one pass (position 11, on the page it has).
    assert shapes == [(0, 1, 1, [1]), (1, 0, 4, [1]), (1, 0, 4, [1]), (1, 0, 1, [0])]
    assert [len(e.token_ids) for e in events] == [1, 4, 4, 1]  # one event per request per step
    assert [t for e in events for t in e.token_ids] == expected(worker, req).output_ids
    assert events[-1].finish_reason == "length" and events[-1].usage == (3, 10, 0)
    assert sched.metrics.dropped_tokens == 0
    assert_no_leaks(sched)


def test_an_eos_inside_a_k_step_block_ends_the_request_there() -> None:
    sched, worker = make(num_pages=32, page_size=4, max_slots=2, decode_steps=4)
    rng = np.random.default_rng(5)
    # A prompt whose 3rd output is the first EOS: mid-way through the first 4-pass block (outputs 2-5).
    def stops_after(prompt: list[int]) -> int:
        ref = generate_alone(worker.model, prompt, 20, (EOS,))
        return len(ref.output_ids) if ref.finish_reason == "stop" else 0

    prompt = next(p for p in (rng.integers(1, 48, 5).tolist() for _ in range(20000)) if stops_after(p) == 3)
    req = Request("a", prompt, max_tokens=20)
    sched.add_request(req)
    shapes, events = drive(sched, worker)
    assert [s[2] for s in shapes] == [1, 4]
    assert [t for e in events for t in e.token_ids] == expected(worker, req).output_ids
    assert events[-1].finish_reason == "stop"
    assert sched.metrics.dropped_tokens == 2  # outputs 4 and 5 of the block, never emitted
    assert_no_leaks(sched)


def test_multi_step_waits_while_a_prompt_prefills_or_a_waiting_request_has_a_slot() -> None:
    sched, worker = make(num_pages=64, page_size=4, max_slots=2, decode_steps=4, max_prefill_tokens=8)
    sched.add_request(Request("a", [1, 2, 3], max_tokens=30, ignore_eos=True))
    shapes = []
    for _ in range(2):
        step = sched.next_step()
        assert step is not None
        shapes.append((step.num_decode, step.num_prefill, step.decode_steps))
        sched.on_step_output(step.step_id, worker.execute(step))
    sched.add_request(Request("b", list(range(1, 20)), max_tokens=30, ignore_eos=True))  # 3 chunks of <= 8
    sched.add_request(Request("c", [4, 5], max_tokens=30, ignore_eos=True))  # waits: no slot is free
    for _ in range(4):
        step = sched.next_step()
        assert step is not None
        shapes.append((step.num_decode, step.num_prefill, step.decode_steps))
        sched.on_step_output(step.step_id, worker.execute(step))
    # a prefills, decodes 4; b's prompt goes in 3 chunks beside a's single decodes; then both decode 4
    # at once although c waits, since no slot is free for it.
    assert shapes == [(0, 1, 1), (1, 0, 4), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 0, 4)]


# ---- overlap details -------------------------------------------------------------

def test_overlap_decodes_behind_an_in_flight_prompt_and_never_past_max_tokens() -> None:
    sched, worker = make(num_pages=16, page_size=4, max_slots=2)
    sched.add_request(Request("a", [1, 2, 3, 4, 5], max_tokens=3, ignore_eos=True))
    s0 = sched.next_step()
    s1 = sched.next_step()  # s0's token is not known yet: the worker feeds it
    assert s0 is not None and s1 is not None
    assert (s1.num_decode, s1.starts.tolist(), s1.admissions) == (1, [5], [])
    out0 = worker.execute(s0)
    s2 = sched.next_step()
    assert s2 is not None and s2.starts.tolist() == [6]
    assert sched.next_step() is None  # three outputs are scheduled: no fourth row
    events = sched.on_step_output(s0.step_id, out0)
    events += sched.on_step_output(s1.step_id, worker.execute(s1))
    events += sched.on_step_output(s2.step_id, worker.execute(s2))
    ref = generate_alone(worker.model, [1, 2, 3, 4, 5], 3, (EOS,), ignore_eos=True)
    assert [t for e in events for t in e.token_ids] == ref.output_ids
    assert [e.finish_reason for e in events] == [None, None, "length"]
    assert events[-1].usage == (5, 3, 0) and sched.metrics.dropped_tokens == 0


def test_a_token_sampled_after_a_stop_is_dropped() -> None:
    sched, worker = make(num_pages=16, page_size=4, max_slots=2)
    model = worker.model
    prompt = next([7, i] for i in range(1, 400) if model([7, i]) == EOS)  # the first token is EOS
    sched.add_request(Request("a", prompt, max_tokens=5))
    s0, s1 = sched.next_step(), sched.next_step()
    assert s0 is not None and s1 is not None and s1.num_decode == 1
    out0, out1 = worker.execute(s0), worker.execute(s1)
    assert sched.on_step_output(s0.step_id, out0)[0].finish_reason == "stop"
    assert sched.on_step_output(s1.step_id, out1) == []
    assert sched.metrics.dropped_tokens == 1
    assert_no_leaks(sched)


def test_fail_all_errors_every_request_and_starts_empty() -> None:
    sched, worker = make(num_pages=16, page_size=4, max_slots=2)
    for i in range(3):  # distinct prompts: identical ones would wait to share the first's pages
        sched.add_request(Request(f"r{i}", [1 + i, 2, 3, 4, 5, 6], max_tokens=8))
    step = sched.next_step()
    assert step is not None and sched.num_running == 2 and sched.num_waiting == 1
    events = sched.fail_all()
    assert sorted((e.request_id, e.finish_reason, tuple(e.token_ids)) for e in events) == [
        ("r0", "error", ()), ("r1", "error", ()), ("r2", "error", ())]
    assert sched.on_step_output(step.step_id, worker.execute(step)) == []  # a result from before is ignored
    assert (sched.num_running, sched.num_waiting, sched.num_free_pages, sched.num_cached_pages) == (0, 0, 16, 0)
    worker = FakeWorker(16, 4, 2, worker.model)  # the worker restarts empty too
    req = Request("again", [1, 2, 3, 4, 5, 6], max_tokens=4, ignore_eos=True)
    run = simulate(sched, worker, {0: [req]}, depth=1)
    assert run.tokens["again"] == expected(worker, req).output_ids and run.usage["again"][2] == 0


def test_the_invariant_check_catches_a_page_with_two_owners() -> None:
    sched, _ = make(num_pages=8, page_size=4, max_slots=2)
    sched.add_request(Request("a", [1, 2, 3, 4, 5, 6], max_tokens=4))
    assert sched.next_step() is not None
    sched.kv.pool.free([sched.running[0].pages[-1]])  # a bug: a running request's page freed
    with pytest.raises(AssertionError, match="pages with two owners"):
        sched.check_invariants()


def test_a_fully_cached_prompt_still_computes_its_last_position() -> None:
    sched, worker = make(num_pages=16, page_size=4, max_slots=2)
    first = Request("first", [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=3, ignore_eos=True)
    again = Request("again", [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=3, ignore_eos=True)
    run = simulate(sched, worker, {0: [first], 10: [again]}, depth=1)
    assert run.tokens["again"] == run.tokens["first"] == expected(worker, first).output_ids
    assert run.usage["again"] == (8, 3, 4)  # the second page holds the last prompt position: recomputed
