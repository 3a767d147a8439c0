"""The overlap step loop: the one place its rules live, with a driver in process and one over gRPC.

The rules (shared/DESIGN.md, "Overlap"):
- up to `depth` steps are sent beyond the oldest step whose result is unread, so the
  worker never waits for this process; depth 0 is overlap off (each result is read
  before the next step is built);
- results are read in step order, each checked to be the oldest one sent, and handed to
  the core, which therefore sees finishes as many steps late as were in flight (and
  drops the tokens sampled after one);
- when the core has no step to build, the oldest result is read (it may end requests or
  let a retracted one back in); with nothing in flight either, the loop is idle.

StepPipeline drives a worker in this process (the LLM class, the benches, the core's
tests): `launch(step)` returns at once with a pending output whose `result()` waits.
AsyncStepPipeline drives the scheduler service's step streams: `send` writes a step,
`receive` reads the next result, `idle` waits for new work. Both yield the core's token
events, one list per result read.
"""
from __future__ import annotations

from collections import deque
from typing import AsyncIterator, Awaitable, Callable, Generic, Iterator, Protocol, TypeVar

import numpy as np

from llmrpc.engine.step import Step, StepOutput
from llmrpc.services.scheduler.request import TokenEvent


class StepCore(Protocol):
    """What the pipeline drives: the scheduler core (or a test's wrapper around it)."""

    def next_step(self) -> Step | None: ...

    def on_step_output(self, step_id: int, tokens: np.ndarray, logprobs: np.ndarray | None = None,
                       top_ids: np.ndarray | None = None,
                       top_logprobs: np.ndarray | None = None) -> list[TokenEvent]: ...


class PendingStep(Protocol):
    """A launched step (engine.runner.PendingOutput is one): `result()` waits for its output."""

    def result(self) -> StepOutput: ...


class StepOrderError(RuntimeError):
    """A result that is not the oldest step's: the worker broke the step protocol."""


H = TypeVar("H")


class _Overlap(Generic[H]):
    """The rules, shared by both drivers; `H` is what a driver keeps for each step in flight."""

    def __init__(self, core: StepCore, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.core = core
        self.depth = depth
        self._in_flight: deque[tuple[int, H]] = deque()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def _step_to_send(self) -> Step | None:
        """The next step to send, or None: then read the oldest result if one is in flight, else idle."""
        if len(self._in_flight) > self.depth:
            return None
        return self.core.next_step()

    def _sent(self, step: Step, handle: H) -> None:
        self._in_flight.append((step.step_id, handle))

    def _oldest(self) -> H:
        return self._in_flight[0][1]

    def _received(self, output: StepOutput) -> list[TokenEvent]:
        expected, _ = self._in_flight.popleft()
        if output.step_id != expected:
            raise StepOrderError(f"step results out of order: got {output.step_id}, expected {expected}")
        return self.core.on_step_output(output.step_id, output.tokens, output.logprobs,
                                        output.top_ids, output.top_logprobs)


class StepPipeline(_Overlap[PendingStep]):
    """The loop over a worker in this process; `run()` ends when the core is idle."""

    def __init__(self, core: StepCore, launch: Callable[[Step], PendingStep], depth: int = 1) -> None:
        super().__init__(core, depth)
        self._launch = launch

    def run(self) -> Iterator[list[TokenEvent]]:
        """Steps until nothing is left to build or read. Breaking out leaves the steps in flight
        to the next `run()`, which reads them first."""
        while True:
            step = self._step_to_send()
            if step is not None:
                self._sent(step, self._launch(step))
            elif self._in_flight:
                yield self._received(self._oldest().result())
            else:
                return


class AsyncStepPipeline(_Overlap[None]):
    """The loop over the workers' step streams; `run()` waits in `idle()` when there is no work."""

    def __init__(self, core: StepCore, send: Callable[[Step], Awaitable[None]],
                 receive: Callable[[], Awaitable[StepOutput]], idle: Callable[[], Awaitable[None]],
                 depth: int = 2) -> None:
        super().__init__(core, depth)
        self._send, self._receive, self._idle = send, receive, idle

    async def run(self) -> AsyncIterator[list[TokenEvent]]:
        """Steps for ever; ends only by an exception from send, receive or idle (or cancellation)."""
        while True:
            step = self._step_to_send()
            if step is not None:
                await self._send(step)
                self._sent(step, None)
            elif self._in_flight:
                yield self._received(await self._receive())
            else:
                await self._idle()
