"""The tokenizer service: the public, text-level `Generation` API in front of the scheduler.

Thin by design: it turns text or chat into token ids (template.py), calls the
scheduler's token-level `Generate`, and turns the token stream back into text
(completion.py). It holds no state across requests, so any number of replicas can
front one scheduler. Stop strings are handled here (the scheduler sees only token
ids), and the upstream call is cancelled the moment one appears or the client goes
away, which frees the request's KV pages in the scheduler at once. A request the
scheduler refuses ends here in the scheduler's own status, details and all
(services/status.py), so its client learns which field was bad.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmrpc.services import rpc, trace
from llmrpc.services.auth import Security
from llmrpc.services.contract import Limits, check_request_id
from llmrpc.services.messages import from_message
from llmrpc.services.status import StatusError
from llmrpc.services.tokenizer.completion import Completion
from llmrpc.services.tokenizer.metrics import FrontMetrics
from llmrpc.services.tokenizer.reasoning import REASONING_PARSER_CHOICES
from llmrpc.services.tokenizer.template import InputError, Message, PromptBuilder, load_tokenizer
from llmrpc.services.tokenizer.tool_parsers import TOOL_PARSER_CHOICES
from llmrpc.v1 import generation_pb2, generation_pb2_grpc

if TYPE_CHECKING:
    from llmrpc.services.tokenizer.http_server import HttpServer

log = logging.getLogger("llmrpc.tokenizer")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class TokenizerConfig:
    model_path: str  # HF directory with tokenizer files, or a .gguf file
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (see TokenizerServer.port)
    scheduler: str = "127.0.0.1:50052"
    model_name: str = ""  # reported by GetModelInfo; empty: the scheduler's, else the path's name
    health_poll_interval_s: float = 0.5
    http_port: int | None = None  # the OpenAI-compatible HTTP port; None: off, 0: any free port
    max_receive_bytes: int = rpc.PUBLIC_MAX_RECEIVE_BYTES  # the largest request a client may send
    # TLS and the API key on the public port; with a CA, the link to the scheduler is mutual TLS.
    security: Security = Security()
    # How the OpenAI chat answers are read: tool calls (tool_parsers.py), reasoning (reasoning.py).
    tool_call_parser: str = "auto"
    reasoning_parser: str = "none"

    def __post_init__(self) -> None:
        if self.tool_call_parser not in TOOL_PARSER_CHOICES:
            raise ValueError(f"tool_call_parser must be one of {TOOL_PARSER_CHOICES}, got {self.tool_call_parser!r}")
        if self.reasoning_parser not in REASONING_PARSER_CHOICES:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSER_CHOICES}, "
                             f"got {self.reasoning_parser!r}")


class TokenizerServicer(generation_pb2_grpc.GenerationServicer):
    """Generation at text level, forwarding token ids to the scheduler."""

    def __init__(self, config: TokenizerConfig, channel: grpc.aio.Channel) -> None:
        self._config = config
        self.metrics = FrontMetrics()
        self._scheduler = generation_pb2_grpc.GenerationStub(channel)
        self.prompts: PromptBuilder | None = None  # set once the tokenizer has loaded

    async def Generate(self, request, context) -> AsyncIterator[generation_pb2.GenerateResponse]:
        try:
            async for response in self.generate(request, context.time_remaining()):
                yield response
        except StatusError as exc:
            await exc.abort(context)

    async def generate(self, request: generation_pb2.GenerateRequest,
                       timeout: float | None = None) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Generate without a gRPC context (the HTTP front door uses it too); raises StatusError.

        Closing the iterator early (client gone) cancels the scheduler's call, which frees
        the request's KV pages at once.
        """
        trace.point("tokenizer: request in")
        prompts = self.prompts
        if prompts is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the tokenizer is still loading", reason="LOADING")
        request_id = request.request_id or uuid.uuid4().hex
        sampling = request.sampling
        check_request_id(request_id)
        prompt = self._prompt_ids(prompts, request)
        trace.point("tokenizer: encoded")
        for i, stop in enumerate(sampling.stop):
            if not stop:
                raise InputError(f"sampling.stop[{i}]", f"sampling.stop[{i}] is empty")

        upstream_sampling = generation_pb2.SamplingParams()
        upstream_sampling.CopyFrom(sampling)
        del upstream_sampling.stop[:]  # the scheduler sees tokens only; stop strings are ours
        upstream = generation_pb2.GenerateRequest(
            request_id=request_id,
            tokens=generation_pb2.TokenIds(ids=prompt),
            sampling=upstream_sampling,
            stream=True,  # even for stream=false: stop strings must be seen as they come
        )
        limits = from_message(Limits, sampling)  # the scheduler checks them; bad ones never stream
        completions = {
            i: Completion(prompts.tokenizer, request_id, i, len(prompt), sampling.stop, limits.min_tokens)
            for i in range(max(limits.n, 1))
        }
        stream = not request.HasField("stream") or request.stream
        merged: dict[int, generation_pb2.GenerateResponse] = {}
        timing = self.metrics.start()
        outcome = "error"

        call = self._scheduler.Generate(upstream, timeout=timeout)
        try:
            async for response in call:
                trace.point("tokenizer: scheduler's message in")
                completion = completions.get(response.index)
                if completion is None:
                    raise StatusError(grpc.StatusCode.INTERNAL,
                                      f"scheduler answered index {response.index} of n={limits.n}")
                if completion.finished:
                    continue  # a token sampled after this index met a stop string
                timing.tokens(response.index, len(response.token_ids))
                out = completion.advance(response)
                if stream:
                    yield out
                else:
                    _merge(merged.setdefault(out.index, generation_pb2.GenerateResponse()), out)
                if all(c.finished for c in completions.values()):
                    break
            unfinished = [i for i, c in completions.items() if not c.finished]
            if unfinished:
                raise StatusError(grpc.StatusCode.INTERNAL,
                                  f"scheduler ended the stream before index {unfinished[0]} finished")
            for index in sorted(merged):
                yield merged[index]
            outcome = "finished"
        except grpc.aio.AioRpcError as exc:
            outcome = "rejected" if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else "error"
            raise self._upstream_error(exc) from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            raise
        finally:
            # No-op after a normal end; otherwise (stop string, client gone, error) it
            # tells the scheduler to drop the request and free its KV pages now.
            call.cancel()
            self.metrics.request_done(outcome)

    async def GetModelInfo(self, request, context) -> generation_pb2.ModelInfo:
        try:
            return await self.model_info(context.time_remaining())
        except StatusError as exc:
            await exc.abort(context)

    async def model_info(self, timeout: float | None = None) -> generation_pb2.ModelInfo:
        """The scheduler's ModelInfo under this service's model name; raises StatusError."""
        try:
            info = await self._scheduler.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._upstream_error(exc) from None
        if self._config.model_name:
            info.model_name = self._config.model_name
        elif not info.model_name:
            info.model_name = _name_of(self._config.model_path)
        return info

    def _upstream_error(self, exc: grpc.aio.AioRpcError) -> StatusError:
        """The scheduler's status, details intact, as this service answers it."""
        return StatusError.of(exc).relayed(f"scheduler at {self._config.scheduler}")

    @staticmethod
    def _prompt_ids(prompts: PromptBuilder, request: generation_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            return prompts.from_text(request.text)
        if kind == "chat":
            chat = request.chat
            messages = [Message(m.role, m.content) for m in chat.messages]
            add_prompt = not chat.HasField("add_generation_prompt") or chat.add_generation_prompt
            return prompts.from_chat(messages, add_prompt)
        if kind == "tokens":
            return prompts.from_tokens(request.tokens.ids)
        raise InputError("input", "input: set one of text, chat or tokens")


def _merge(into: generation_pb2.GenerateResponse, piece: generation_pb2.GenerateResponse) -> None:
    """Accumulates a stream=false answer: all text and tokens, the last finish and usage."""
    into.request_id, into.index = piece.request_id, piece.index
    into.text += piece.text
    into.token_ids.extend(piece.token_ids)
    into.logprobs.extend(piece.logprobs)
    if piece.finish_reason:
        into.finish_reason = piece.finish_reason
    if piece.HasField("usage"):
        into.usage.CopyFrom(piece.usage)


def _name_of(model_path: str) -> str:
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


@dataclass
class TokenizerServer:
    """A started tokenizer service: its bound port, its health, and `stop()`."""

    config: TokenizerConfig
    server: rpc.Server
    servicer: TokenizerServicer
    channel: grpc.aio.Channel
    serving: bool = False
    load_error: BaseException | None = None
    http: HttpServer | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def wait_serving(self, serving: bool = True, timeout: float = 30.0) -> None:
        """Waits until the health status is `serving` (tests and embedders use this)."""

        async def wait() -> None:
            while self.serving != serving:
                if self.load_error is not None:
                    raise RuntimeError("the tokenizer failed to load") from self.load_error
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_for_termination(self) -> None:
        await self.server.server.wait_for_termination()
        if self.load_error is not None:
            raise RuntimeError(f"cannot load the tokenizer from {self.config.model_path}") from self.load_error

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.channel.close()

    async def _load(self, tokenizer) -> None:
        try:
            if tokenizer is None:
                tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model_path)
        except Exception as exc:
            log.error("cannot load the tokenizer from %s: %s", self.config.model_path, exc)
            self.load_error = exc
            self._changed.set()
            await self.server.stop(0)
            return
        self.servicer.prompts = PromptBuilder(tokenizer)
        log.info("tokenizer loaded from %s", self.config.model_path)
        await self._follow_scheduler()

    async def _follow_scheduler(self) -> None:
        """SERVING exactly while the scheduler says SERVING; polled, so it flips back too."""
        health = health_pb2_grpc.HealthStub(self.channel)
        interval = self.config.health_poll_interval_s
        while True:
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=max(interval, 1.0))
                up = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                up = False
            if up != self.serving:
                log.info("scheduler at %s is %s", self.config.scheduler, "serving" if up else "not serving")
                self.serving = up
                await self.server.set_serving(up)
                self._changed.set()
            await asyncio.sleep(interval)


async def start(config: TokenizerConfig, tokenizer=None) -> TokenizerServer:
    """Binds and starts the service (NOT_SERVING); loading and health follow in the background.

    `tokenizer` skips loading from `config.model_path` (in-process embedders, tests).
    """
    channel = rpc.channel(config.scheduler, config.security.channel_credentials())
    servicer = TokenizerServicer(config, channel)
    server = await rpc.start_server(
        f"{config.host}:{config.port}",
        [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, s)],
        [GENERATION_SERVICE],
        security=config.security,
        require_client_cert=False,  # the public port: clients prove themselves with the API key
        max_receive_bytes=config.max_receive_bytes,
    )
    handle = TokenizerServer(config, server, servicer, channel)
    if config.http_port is not None:
        from llmrpc.services.tokenizer.http_server import start_http  # aiohttp only when HTTP is on

        handle.http = await start_http(handle, config.host, config.http_port, config.security)
    handle._tasks.append(asyncio.create_task(handle._load(tokenizer)))
    log.info("tokenizer listening on %s:%d, scheduler %s", config.host, server.port, config.scheduler)
    return handle


async def serve(config: TokenizerConfig) -> None:
    """Runs the tokenizer service until the process is stopped."""
    handle = await start(config)
    try:
        await handle.wait_for_termination()
    finally:
        await handle.stop()
