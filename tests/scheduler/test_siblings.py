"""Requests with the same prompt admitted together (n > 1 siblings) prefill it once.

The core is driven step by step against the FakeWorker, which checks every page
the scheduler hands it, so shared pages are also verified to hold the right KV.
"""
from __future__ import annotations

import numpy as np
import pytest

from llmrpc.bench.fake_worker import FakeWorker, HashModel, generate_alone
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.pipeline import StepPipeline
from llmrpc.services.scheduler.request import Request, Sampling
from llmrpc.services.scheduler.scheduler import Scheduler

EOS = 0


def run_all(sched: Scheduler, worker: FakeWorker, requests: list[Request]) -> dict[str, list[int]]:
    for req in requests:
        sched.add_request(req)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for events in StepPipeline(sched, worker.launch, depth=0).run():
        for event in events:
            outputs[event.request_id].extend(event.token_ids)
    return outputs


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_four_siblings_prefill_their_prompt_once(policy: str) -> None:
    page_size, prompt_len = 16, 200
    config = SchedulerConfig(num_pages=256, page_size=page_size, max_slots=8, context_length=1024,
                             eos_token_ids=(EOS,), max_prefill_tokens=1024, schedule_policy=policy,
                             check_invariants=True, overlap=False)
    sched = Scheduler(config)
    worker = FakeWorker(256, page_size, 8, HashModel(5000))
    prompt = np.random.default_rng(0).integers(1, 5000, prompt_len).tolist()
    siblings = [Request(f"r#{i}", prompt, max_tokens=6, ignore_eos=True) for i in range(4)]
    outputs = run_all(sched, worker, siblings)
    # Siblings 1..3 reuse every full page of the first's prompt: each computes only the
    # tail past the last full page of prompt[:-1] (199 // 16 = 12 pages = 192 tokens).
    shared = (prompt_len - 1) // page_size * page_size
    assert sched.metrics.prefill_tokens == prompt_len + 3 * (prompt_len - shared)
    assert sched.metrics.cached_prompt_tokens == 3 * shared
    want = generate_alone(worker.model, tuple(prompt), 6, (EOS,), 0, True, frozenset()).output_ids
    assert all(out == want for out in outputs.values())


def test_different_prompts_sharing_only_a_cached_prefix_do_not_wait_for_each_other() -> None:
    config = SchedulerConfig(num_pages=256, page_size=4, max_slots=8, context_length=1024,
                             eos_token_ids=(EOS,), max_prefill_tokens=1024, check_invariants=True,
                             overlap=False)
    sched = Scheduler(config)
    worker = FakeWorker(256, 4, 8, HashModel(50))
    system = list(range(1, 17))
    run_all(sched, worker, [Request("warm", system + [20], max_tokens=1)])
    users = [Request(f"u{i}", system + [30 + i] * 9, max_tokens=1) for i in range(3)]
    for req in users:
        sched.add_request(req)
    step = sched.next_step()
    assert step is not None and len(step.admissions) == 3  # all admitted in one step


def test_logprobs_are_cut_to_each_requests_own_top_n() -> None:
    config = SchedulerConfig(num_pages=64, page_size=4, max_slots=4, context_length=256,
                             eos_token_ids=(EOS,), check_invariants=True, overlap=False)
    sched = Scheduler(config)
    sched.add_request(Request("none", [5, 6, 7], max_tokens=1))
    sched.add_request(Request("zero", [5, 6, 8], Sampling(logprobs=0), max_tokens=1))
    sched.add_request(Request("two", [5, 6, 9], Sampling(logprobs=2), max_tokens=1))
    step = sched.next_step()
    assert step is not None
    events = sched.on_step_output(
        step.step_id, np.array([11, 12, 13], dtype=np.int32),
        np.array([-0.5, -1.5, -2.5], dtype=np.float32),
        np.array([[11, 3, 4], [12, 3, 4], [7, 13, 4]], dtype=np.int32),
        np.array([[-0.5, -1, -2], [-1.5, -2, -3], [-0.25, -2.5, -3]], dtype=np.float32))
    by_id = {e.request_id: e for e in events}
    assert by_id["none"].logprobs is None
    assert [tuple(r) for r in by_id["zero"].logprobs] == [(-1.5, [], [])]
    assert [tuple(r) for r in by_id["two"].logprobs] == [(-2.5, [7, 13], [-0.25, -2.5])]
