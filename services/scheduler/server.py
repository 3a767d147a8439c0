"""The scheduler service: token-level Generation API in front of the scheduling core.

The servicer is thin: it validates requests (a constrained one also has rank 0
compile its grammar, CompileConstraint, before it is queued), hands them to the core
(`Scheduler`), and fans each step the core builds out to every worker rank over
one long-lived Steps stream per rank. With overlap on, up to `overlap_depth`
steps are sent ahead of the oldest step whose tokens are not read yet, so the worker
never waits for this process: depth 1 hides this process's step building, a deeper
pipeline also hides the round trip, which bounds one stream's tokens/s.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

from llmrpc.engine.constraint import Constraint
from llmrpc.engine.step import Step, StepOutput
from llmrpc.services import rpc, trace
from llmrpc.services.auth import Security
from llmrpc.services.contract import FINISH_REASONS
from llmrpc.services.messages import to_message
from llmrpc.services.protocol import decode_output, encode_grammar, encode_step
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.exposition import scrape_handler
from llmrpc.services.scheduler.pipeline import AsyncStepPipeline, StepOrderError
from llmrpc.services.scheduler.request import AdmissionError, Request, TokenEvent, merge_events
from llmrpc.services.scheduler.validation import admission_error, build_requests
from llmrpc.services.scheduler.scheduler import Scheduler
from llmrpc.services.scheduler.smg import SERVICE_NAME as SMG_SERVICE, SmgScheduler
from llmrpc.services.status import StatusError
from llmrpc.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("llmrpc.scheduler")

# A grammar's first compile loads the worker's tokenizer (seconds); a big JSON schema compiles in about a second.
COMPILE_TIMEOUT_S = 120.0

@dataclass(frozen=True)
class SchedulerServiceConfig:
    workers: tuple[str, ...]  # one target per TP rank, rank order (host:port or unix:path)
    host: str = "127.0.0.1"
    port: int = 50052
    max_prefill_tokens: int = 8192
    schedule_policy: str = "fcfs"
    check_invariants: bool = False
    disable_radix_cache: bool = False  # no prefix sharing between requests (mini-sglang's --cache naive)
    overlap_depth: int = 2  # steps sent ahead of the oldest unread result; 0: overlap off
    decode_steps: int = 1  # the most decode passes per step (multi-step decode)
    reconnect_interval_s: float = 0.5
    max_queued_requests: int = 1024  # waiting requests beyond this are refused with RESOURCE_EXHAUSTED
    max_prompt_tokens: int = 0  # longer prompts are INVALID_ARGUMENT; 0: only the context bounds them
    max_receive_bytes: int = rpc.PUBLIC_MAX_RECEIVE_BYTES  # clients that tokenize themselves call us directly
    security: Security = Security()  # TLS/mTLS on our port; its CA and cert also secure the worker links

    def __post_init__(self) -> None:
        if self.overlap_depth < 0:
            raise ValueError(f"overlap_depth must be >= 0, got {self.overlap_depth}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")


class WorkerLost(Exception):
    """A rank's step stream broke or ended."""


class WorkerGroup:
    """The step streams to every rank: identical commands out, rank 0's tokens back.

    Every rank's stream is read all the time, not only rank 0's: when one rank dies,
    the others may wait forever in a collective with it and never answer, so the
    first broken stream loses the whole group at once. `receive` then raises
    WorkerLost instead of waiting, and `on_lost` wakes a step loop that is idle.
    """

    def __init__(self, targets: tuple[str, ...], credentials: grpc.ChannelCredentials | None = None,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._targets = targets
        self._channels = [rpc.channel(t, credentials) for t in targets]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        self._calls: list[Any] = []  # grpc.aio stream-stream calls (untyped)
        self._readers: list[asyncio.Task[None]] = []
        # Rank 0's results in step order, then the WorkerLost that ended the group, if any.
        self._results: asyncio.Queue[worker_pb2.StepResult | WorkerLost] = asyncio.Queue()
        self._on_lost = on_lost
        self.error: WorkerLost | None = None
        self.infos: list[worker_pb2.WorkerInfo] = []

    async def connect(self) -> None:
        self.infos = [await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5) for stub in self._stubs]
        for rank, info in enumerate(self.infos):
            if (info.tp_rank, info.tp_size) != (rank, len(self._targets)):
                raise ValueError(f"{self._targets[rank]} is rank {info.tp_rank} of {info.tp_size}, "
                                 f"not rank {rank} of {len(self._targets)}: list --workers in rank order")
        self._calls = [stub.Steps() for stub in self._stubs]
        self._readers = [asyncio.create_task(self._read(rank, call)) for rank, call in enumerate(self._calls)]

    async def _read(self, rank: int, call: Any) -> None:
        """Rank 0's results go to `receive`; the other ranks' only show that they are alive."""
        try:
            while (result := await call.read()) is not grpc.aio.EOF:
                if rank == 0:
                    self._results.put_nowait(result)
            self._lose(WorkerLost(f"rank {rank} closed its step stream"))
        except grpc.aio.AioRpcError as exc:
            self._lose(WorkerLost(f"rank {rank}: {exc.code().name}: {exc.details()}"))

    def _lose(self, exc: WorkerLost) -> None:
        if self.error is None:
            self.error = exc
            self._results.put_nowait(exc)
            self._on_lost()

    def check(self) -> None:
        """Raises the WorkerLost that ended the group, if one did."""
        if self.error is not None:
            raise self.error

    async def send(self, command: worker_pb2.StepCommand) -> None:
        self.check()
        try:
            for call in self._calls:
                await call.write(command)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise WorkerLost(str(exc)) from exc

    async def compile(self, constraint: Constraint) -> None:
        """Rank 0 compiles `constraint` (only rank 0 masks: its draw is every rank's); StatusError when it refuses."""
        try:
            await self._stubs[0].CompileConstraint(encode_grammar(constraint), timeout=COMPILE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise StatusError.of(exc).relayed(f"worker {self._targets[0]}") from None

    async def receive(self) -> worker_pb2.StepResult:
        result = await self._results.get()
        if isinstance(result, WorkerLost):
            raise result
        return result

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        for call in self._calls:
            call.cancel()
        self._calls, self._readers = [], []
        for channel in self._channels:
            await channel.close()


class _Listener:
    """Where the step loop leaves one Generate call's token events.

    A streaming call is woken once per step that has events for it (not once per event); a
    stream=False call only when one of its completions finishes, so an offline batch of B
    requests costs the loop no B coroutine wake-ups and responses per step.
    """

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._events: list[TokenEvent] = []
        self._ready = asyncio.Event()

    def put(self, event: TokenEvent) -> None:
        self._events.append(event)
        if self.stream or event.finish_reason is not None:
            self._ready.set()

    async def take(self) -> list[TokenEvent]:
        """Every event since the last take, oldest first (waits for at least one wake-up)."""
        await self._ready.wait()
        self._ready.clear()
        events, self._events = self._events, []
        return events


class SchedulerService(generation_pb2_grpc.GenerationServicer):
    """Generation at token level, plus the step loop that drives the workers."""

    def __init__(self, config: SchedulerServiceConfig) -> None:
        self._config = config
        self._core: Scheduler | None = None
        self._info: worker_pb2.WorkerInfo | None = None
        self._group: WorkerGroup | None = None
        self._streams: dict[str, _Listener] = {}  # by request id (each of a call's n completions)
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._server: rpc.Server | None = None

    # ---- Generation API -------------------------------------------------

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        trace.point("scheduler: request in")
        request_id = request.request_id or uuid.uuid4().hex
        try:
            requests = await self._admit(request, request_id)
        except StatusError as exc:
            await exc.abort(context)
        stream = not request.HasField("stream") or request.stream
        listener = _Listener(stream)
        index_of = {req.request_id: i for i, req in enumerate(requests)}
        for req in requests:
            self._streams[req.request_id] = listener
        trace.point("scheduler: admitted")
        self._wake.set()
        open_ids = set(index_of)
        started: set[int] = set()
        collected: dict[int, list[TokenEvent]] = {}  # stream=False: each index's events, answered at the end
        try:
            while open_ids:
                for event in await listener.take():
                    if event.finish_reason == "error":
                        await StatusError(grpc.StatusCode.UNAVAILABLE, "worker lost: the request was dropped",
                                          reason="WORKER_LOST").abort(context)
                    if event.finish_reason is not None:
                        open_ids.discard(event.request_id)
                    index = index_of[event.request_id]
                    if stream:
                        # Usage goes on each index's first message too: a front door that ends the
                        # request early (a stop string) still knows its prompt and cached tokens.
                        yield self._response(request_id, index, event, with_usage=index not in started)
                        started.add(index)
                    else:
                        collected.setdefault(index, []).append(event)
            for index in sorted(collected):
                yield self._response(request_id, index, merge_events(collected[index]))
        finally:
            for rid in index_of:
                self._streams.pop(rid, None)
                if rid in open_ids and self._core is not None:
                    self._core.abort(rid)  # cancelled or failed: free its KV pages now
            self._wake.set()

    def _connected(self) -> tuple[Scheduler, worker_pb2.WorkerInfo, WorkerGroup]:
        core, info, group = self._core, self._info, self._group
        if not self._ready.is_set() or core is None or info is None or group is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "scheduler has no worker connected", reason="NO_WORKER")
        return core, info, group

    async def _admit(self, request: generation_pb2.GenerateRequest, request_id: str) -> list[Request]:
        """Checks the request and adds its completions to the core; StatusError when it cannot be served.

        A constrained request is not admitted until rank 0 has compiled its grammar (once per distinct
        grammar; the worker caches it), so a grammar xgrammar refuses is INVALID_ARGUMENT here and the
        step thread never compiles.
        """
        core, info, group = self._connected()
        requests = build_requests(request, request_id, info, self._config.max_prompt_tokens)
        constraint = requests[0].sampling.constraint  # the same for every completion
        if constraint is not None:
            await group.compile(constraint)
            core, info, group = self._connected()  # the workers may have been lost meanwhile
        if any(req.request_id in self._streams for req in requests):
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is in use",
                              reason="REQUEST_ID_IN_USE")
        limit = self._config.max_queued_requests
        # Requests that free slots will take at the next step are not queued behind anyone.
        queued = core.num_waiting - max(0, core.config.max_slots - core.num_running)
        if limit and queued + len(requests) > limit:
            # Refuse at once: a client can retry elsewhere sooner than it would wait here.
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the waiting queue is full ({max(queued, 0)} of {limit} requests)", reason="QUEUE_FULL")
        try:
            core.add_requests(requests)  # all n completions, or none
        except AdmissionError as exc:
            raise admission_error(exc) from None
        return requests

    @staticmethod
    def _response(request_id: str, index: int, event: TokenEvent,
                  with_usage: bool = False) -> generation_pb2.GenerateResponse:
        response = generation_pb2.GenerateResponse(
            request_id=request_id, index=index, token_ids=list(event.token_ids)
        )
        if event.logprobs is not None:
            response.logprobs.extend(
                generation_pb2.TokenLogprob(
                    token_id=token, logprob=row.logprob,
                    top=[generation_pb2.TopLogprob(token_id=t, logprob=lp)
                         for t, lp in zip(row.top_ids, row.top_logprobs)])
                for token, row in zip(event.token_ids, event.logprobs))
        if event.finish_reason is not None:
            response.finish_reason = FINISH_REASONS[event.finish_reason]
        if with_usage or event.finish_reason is not None:
            prompt, completion, cached = event.usage
            response.usage.CopyFrom(
                generation_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=cached)
            )
        return response

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        info = self._info
        if info is None:
            await StatusError(grpc.StatusCode.UNAVAILABLE, "scheduler has no worker connected",
                              reason="NO_WORKER").abort(context)
        # The model's facts are the worker's fields of the same names; the rest is this process's.
        total_kv_tokens = self._core.config.num_pages * info.page_size if self._core else 0
        return to_message(info, generation_pb2.ModelInfo, total_kv_tokens=total_kv_tokens, **self._load())

    def _load(self) -> dict[str, int]:
        """ModelInfo's live-load fields, all 0 while no worker is connected."""
        core = self._core
        if core is None or not self._ready.is_set():
            return dict.fromkeys(("kv_pages_total", "kv_pages_free", "kv_pages_cached", "requests_running",
                                  "requests_waiting"), 0)
        return dict(kv_pages_total=core.config.num_pages, kv_pages_free=core.num_free_pages,
                    kv_pages_cached=core.num_cached_pages, requests_running=core.num_running,
                    requests_waiting=core.num_waiting)

    # ---- for the contracts served beside Generation (smg.py) --------------

    @property
    def core(self) -> Scheduler | None:
        """The scheduling core while workers are connected, else None."""
        return self._core if self._ready.is_set() else None

    @property
    def worker_info(self) -> worker_pb2.WorkerInfo | None:
        return self._info

    def abort(self, request_id: str) -> bool:
        """Ends a request's completions now, as a cancelled stream would (their streams end with abort)."""
        core = self.core
        if core is None:
            return False
        ids = [rid for rid in self._streams if rid == request_id or rid.startswith(f"{request_id}#")]
        live = [core.requests[rid] for rid in ids if rid in core.requests]
        for req in live:
            core.abort(req.request_id)
            self._dispatch([TokenEvent(req.request_id, [], "abort", req.usage)])
        self._wake.set()
        return bool(live)

    # ---- the step loop ----------------------------------------------------

    async def run(self) -> None:
        """Connects to the workers, drives steps, and reconnects when a rank is lost."""
        while True:
            group = WorkerGroup(self._config.workers, self._config.security.channel_credentials(),
                                on_lost=self._wake.set)
            try:
                await group.connect()
            except (grpc.aio.AioRpcError, ValueError) as exc:
                if isinstance(exc, ValueError):
                    log.error("%s", exc)
                else:
                    log.debug("workers not ready: %s", exc.code().name)
                await group.close()
                await asyncio.sleep(self._config.reconnect_interval_s)
                continue
            self._group = group
            core = self._start_core(group.infos)
            await self._set_serving(True)
            try:
                await self._drive(group, core)
            except (WorkerLost, StepOrderError) as exc:
                log.error("worker lost: %s; failing %d requests in flight", exc, len(self._streams))
            finally:
                self._ready.clear()
                self._group = None
                await self._set_serving(False)
                self._dispatch(core.fail_all())
                await group.close()

    def _start_core(self, infos: list[worker_pb2.WorkerInfo]) -> Scheduler:
        first = infos[0]
        self._info = first
        self._core = Scheduler(
            SchedulerConfig(
                num_pages=min(i.num_pages for i in infos),  # KV capacity: the minimum over ranks
                page_size=first.page_size,
                max_slots=min(i.max_slots for i in infos),
                context_length=first.context_length,
                eos_token_ids=tuple(first.eos_token_ids),
                max_prefill_tokens=self._config.max_prefill_tokens,
                schedule_policy=self._config.schedule_policy,
                check_invariants=self._config.check_invariants,
                overlap=self._config.overlap_depth > 0,
                prefix_cache=not self._config.disable_radix_cache,
                decode_steps=self._config.decode_steps,
            )
        )
        self._ready.set()
        log.info("connected to %d worker rank(s): %s, %d KV pages x %d tokens, %d slots, overlap depth %d%s",
                 len(infos), first.model_name, self._core.config.num_pages, first.page_size,
                 self._core.config.max_slots, self._config.overlap_depth,
                 ", prefix cache off" if self._config.disable_radix_cache else "")
        return self._core

    async def _drive(self, group: WorkerGroup, core: Scheduler) -> None:
        async def send(step: Step) -> None:
            trace.point("scheduler: step built")
            await group.send(encode_step(step))
            trace.point("scheduler: step sent")

        async def receive() -> StepOutput:
            result = await group.receive()
            trace.point("scheduler: result in")
            return decode_output(result)

        async def idle() -> None:
            self._wake.clear()
            await self._wake.wait()  # a new request, or a lost rank (the group's on_lost)
            group.check()

        pipeline = AsyncStepPipeline(core, send, receive, idle, self._config.overlap_depth)
        async for events in pipeline.run():
            self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            listener = self._streams.get(event.request_id)
            if listener is not None:
                listener.put(event)

    async def _set_serving(self, serving: bool) -> None:
        if self._server is not None:
            await self._server.set_serving(serving)


async def serve(config: SchedulerServiceConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the scheduler service until cancelled."""
    service = SchedulerService(config)
    smg = SmgScheduler(service, config)  # SMG's engine contract, on the same port
    server = await rpc.start_server(
        f"{config.host}:{config.port}",
        [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(service, s), smg.add_to,
         lambda s: s.add_generic_rpc_handlers((scrape_handler(lambda: service._core),))],
        [generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name, SMG_SERVICE],
        security=config.security,
        max_receive_bytes=config.max_receive_bytes,
    )
    service._server = server
    log.info("scheduler listening on %s:%d, workers %s", config.host, server.port, ", ".join(config.workers))
    loop = asyncio.create_task(service.run())
    try:
        if ready is not None:
            await service._ready.wait()
            ready.set()
        await server.server.wait_for_termination()
    finally:
        loop.cancel()
        await server.stop()
