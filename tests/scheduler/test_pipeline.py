"""StepPipeline and AsyncStepPipeline: the overlap rules, the same in both drivers.

The real core runs against the FakeWorker; each test records the order in which steps
are sent and their results read.
"""
from __future__ import annotations

import asyncio

import pytest

from llmrpc.bench.fake_worker import Executed, FakeWorker, HashModel, generate_alone
from llmrpc.engine.step import Step, StepOutput
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.pipeline import AsyncStepPipeline, StepOrderError, StepPipeline
from llmrpc.services.scheduler.request import Request
from llmrpc.services.scheduler.scheduler import Scheduler

EOS = 0
PROMPT = [5, 6, 7]
# One request, 4 outputs: a prefill step and three decode steps (ids 0..3).
TRACES = {
    0: ["send 0", "read 0", "send 1", "read 1", "send 2", "read 2", "send 3", "read 3"],
    1: ["send 0", "send 1", "read 0", "send 2", "read 1", "send 3", "read 2", "read 3"],
    2: ["send 0", "send 1", "send 2", "read 0", "send 3", "read 1", "read 2", "read 3"],
}


def setup(depth: int) -> tuple[Scheduler, FakeWorker]:
    sched = Scheduler(SchedulerConfig(num_pages=16, page_size=4, max_slots=2, context_length=64,
                                      eos_token_ids=(EOS,), check_invariants=True, overlap=depth > 0))
    sched.add_request(Request("a", PROMPT, max_tokens=4, ignore_eos=True))
    return sched, FakeWorker(16, 4, 2, HashModel(50))


def expected_tokens(worker: FakeWorker) -> list[int]:
    return generate_alone(worker.model, PROMPT, 4, (EOS,), ignore_eos=True).output_ids


class Recording:
    """The FakeWorker's launch, with each send and read written to `trace`."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.trace: list[str] = []

    def launch(self, step: Step) -> Recording.Read:
        self.trace.append(f"send {step.step_id}")
        return Recording.Read(self, self.worker.launch(step))

    class Read:
        def __init__(self, owner: Recording, done: Executed) -> None:
            self.owner, self.done = owner, done

        def result(self) -> StepOutput:
            self.owner.trace.append(f"read {self.done.output.step_id}")
            return self.done.result()


@pytest.mark.parametrize("depth", sorted(TRACES))
def test_steps_go_up_to_depth_ahead_of_the_oldest_unread_result(depth: int) -> None:
    sched, worker = setup(depth)
    recording = Recording(worker)
    pipeline = StepPipeline(sched, recording.launch, depth)
    events = [e for batch in pipeline.run() for e in batch]
    assert recording.trace == TRACES[depth]
    assert [t for e in events for t in e.token_ids] == expected_tokens(worker)
    assert [e.finish_reason for e in events] == [None, None, None, "length"]
    assert pipeline.num_in_flight == 0 and sched.num_in_flight == 0


class Idle(Exception):
    """Stops AsyncStepPipeline.run, which otherwise waits for work for ever."""


@pytest.mark.parametrize("depth", sorted(TRACES))
def test_the_async_driver_keeps_the_same_order(depth: int) -> None:
    sched, worker = setup(depth)
    trace: list[str] = []
    results: asyncio.Queue[StepOutput] = asyncio.Queue()
    idles: list[int] = []

    async def send(step: Step) -> None:
        trace.append(f"send {step.step_id}")
        results.put_nowait(worker.launch(step).result())

    async def receive() -> StepOutput:
        out = await results.get()
        trace.append(f"read {out.step_id}")
        return out

    async def idle() -> None:
        idles.append(pipeline.num_in_flight)
        raise Idle

    async def drive() -> list:
        events = []
        with pytest.raises(Idle):
            async for batch in pipeline.run():
                events += batch
        return events

    pipeline = AsyncStepPipeline(sched, send, receive, idle, depth)
    events = asyncio.run(drive())
    assert trace == TRACES[depth]
    assert idles == [0]  # idle only once nothing is in flight
    assert [t for e in events for t in e.token_ids] == expected_tokens(worker)


def test_breaking_out_leaves_the_steps_in_flight_to_the_next_run() -> None:
    sched, worker = setup(2)
    recording = Recording(worker)
    pipeline = StepPipeline(sched, recording.launch, 2)
    tokens = []
    for batch in pipeline.run():
        tokens += [t for e in batch for t in e.token_ids]
        break
    assert (pipeline.num_in_flight, tokens) == (2, expected_tokens(worker)[:1])
    tokens += [t for batch in pipeline.run() for e in batch for t in e.token_ids]
    assert recording.trace == TRACES[2] and tokens == expected_tokens(worker)


def test_a_result_for_another_step_is_refused() -> None:
    sched, worker = setup(1)
    launched: list[Executed] = []

    def launch(step: Step) -> Executed:
        launched.append(worker.launch(step))
        return launched[0]  # always step 0's result

    pipeline = StepPipeline(sched, launch, 1)
    with pytest.raises(StepOrderError, match="got 0, expected 1"):
        for _ in pipeline.run():
            pass


def test_depth_must_not_be_negative() -> None:
    sched, worker = setup(0)
    with pytest.raises(ValueError, match="depth must be >= 0"):
        StepPipeline(sched, worker.launch, -1)
