"""The worker service: one process per TP rank, executing the scheduler's steps in order.

It loads its shard of the model (in a thread, so health answers NOT_SERVING while
weights load), reports capacity through GetInfo, and runs the Steps stream:
commands are decoded on the event loop while the previous step computes on a
dedicated thread, so receiving step N+1 overlaps computing step N. The compute
thread only launches GPU work (`ModelRunner.launch`); a second thread waits for
each step's tokens to reach the host, so step N+1 is launched while step N still
runs on the GPU. With several tensor-parallel ranks a failed step means the ranks'
process group is broken, so the process exits and its supervisor restarts the group.

CompileConstraint compiles a request's grammar on a small thread pool of its own (never
the step thread) into the runner's grammar cache, which the step's admission then reads.
The first one loads the model's tokenizer; a model without one refuses every constraint.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import grpc

from llmrpc.engine.config import EngineConfig
from llmrpc.services import rpc, trace
from llmrpc.services.auth import Security
from llmrpc.services.messages import to_message
from llmrpc.engine.constraint import ConstraintError
from llmrpc.services.protocol import constraint_error, decode_grammar, decode_step, encode_output
from llmrpc.services.status import StatusError
from llmrpc.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from llmrpc.engine.runner import ModelRunner

log = logging.getLogger("llmrpc.worker")


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 50060
    unix_socket: str | None = None  # also listen on unix:PATH (the scheduler's fast path on one host)
    security: Security = Security()  # with a CA: only schedulers whose client cert it signed (mTLS)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Thin adapter from the Worker RPCs onto the engine's ModelRunner."""

    def __init__(self, config: WorkerConfig) -> None:
        self._config = config
        self._runner: ModelRunner | None = None  # set once the model is loaded
        # One thread runs every forward pass, in order.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        # Waiting for a step's tokens must not hold up the launch of the next one.
        self._results = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result")
        # Grammar compiles: off the step thread, two at a time (xgrammar uses threads of its own too).
        self._compiles = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._active_stream: asyncio.Event | None = None

    @property
    def info(self):
        return self._runner.info

    def load(self) -> None:
        from llmrpc.engine.runner import ModelRunner  # torch import stays off the event loop

        self._runner = ModelRunner(self._config.engine)

    def _launch(self, step):
        """ModelRunner.launch on the compute thread; with several ranks a failure ends the process."""
        trace.point("worker: launch")
        try:
            return self._runner.launch(step)
        except Exception:
            if self._config.engine.tp_size == 1:
                raise  # the stream reports it; the next stream may run
            # A peer is gone or the ranks' collectives are out of step: this process can never rejoin
            # its group, so it ends (even when no stream is left to report it) and its supervisor
            # restarts the group.
            log.critical("rank %d exits: its tensor-parallel group is broken", self._config.engine.tp_rank,
                         exc_info=True)
            logging.shutdown()
            os._exit(1)  # not sys.exit: another thread may still wait in a collective

    async def _loaded(self, context) -> ModelRunner:
        """The runner, or UNAVAILABLE while the model loads."""
        if self._runner is None:
            await StatusError(grpc.StatusCode.UNAVAILABLE, "worker is still loading the model",
                              reason="LOADING").abort(context)
        return self._runner

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        runner = await self._loaded(context)
        return to_message(runner.info, worker_pb2.WorkerInfo)  # EngineInfo's fields of the same names

    async def CompileConstraint(self, request, context) -> worker_pb2.CompileConstraintResult:
        runner = await self._loaded(context)
        try:
            constraint = decode_grammar(request)  # ValueError: a kind this worker does not know
            await asyncio.get_running_loop().run_in_executor(self._compiles, runner.compile_constraint, constraint)
        except ValueError as exc:
            if not isinstance(exc, ConstraintError):
                exc = ConstraintError("constraint", str(exc))
            await constraint_error(exc).abort(context)
        return worker_pb2.CompileConstraintResult()

    async def Steps(self, request_iterator, context) -> AsyncIterator[worker_pb2.StepResult]:
        await self._loaded(context)
        if self._active_stream is not None:
            # A reconnecting scheduler replaces the old stream; the old one ends.
            self._active_stream.set()
        ended = asyncio.Event()
        self._active_stream = ended
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue = asyncio.Queue()
        log.info("scheduler connected: step stream open")

        async def receive() -> None:
            try:
                async for command in request_iterator:
                    trace.point("worker: step in")
                    step = decode_step(command)
                    pending.put_nowait(loop.run_in_executor(self._compute, self._launch, step))
            finally:
                pending.put_nowait(None)

        receiver = asyncio.create_task(receive())
        try:
            while not ended.is_set():
                future = await pending.get()
                if future is None:
                    break
                try:
                    launched = await future
                    trace.point("worker: launched")
                    output = (launched.result() if launched.done()
                              else await loop.run_in_executor(self._results, launched.result))
                except Exception as exc:  # a failed step ends the stream loudly
                    log.exception("step failed")
                    await StatusError(grpc.StatusCode.INTERNAL, f"step failed: {exc!r}",
                                      reason="STEP_FAILED").abort(context)
                trace.point("worker: tokens on the host")
                yield encode_output(output)
        finally:
            receiver.cancel()
            if self._active_stream is ended:
                self._active_stream = None
            log.info("step stream closed")


async def serve(config: WorkerConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the worker until cancelled."""
    if interval := os.environ.get("LLMRPC_SWITCH_INTERVAL_S"):
        # The event loop, the compute thread and the result thread share the GIL; how long one waits for
        # it is CPython's switch interval (5 ms by default, about a decode step). bench/gpu_run8.sh times both.
        sys.setswitchinterval(float(interval))
    servicer = WorkerServicer(config)
    addresses = [f"{config.host}:{config.port}"]
    if config.unix_socket:
        addresses.append(f"unix:{config.unix_socket}")
    server = await rpc.start_server(
        addresses,
        [lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s)],
        [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
        security=config.security,
    )
    log.info("worker rank %d listening on %s, loading %s",
             config.engine.tp_rank, " and ".join(addresses), config.engine.model_path)
    try:
        await asyncio.to_thread(servicer.load)
        await server.set_serving(True)
        info = servicer.info
        log.info("worker ready: %s, %d KV pages x %d tokens, %d slots, %s %s",
                 info.architecture, info.num_pages, info.page_size, info.max_slots, info.device, info.dtype)
        if ready is not None:
            ready.set()
        await server.server.wait_for_termination()
    finally:
        await server.stop()
