"""The OpenAI-compatible HTTP front door, served by the tokenizer process beside its gRPC port.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or SSE with
`stream: true`), GET /v1/models, /health and /metrics. Every generation goes
through the same `TokenizerServicer.generate` as gRPC, on the same asyncio loop,
so text, stop strings and errors are identical on both doors.

Chat requests are rendered here with the model's chat template (template.py: tools and
template variables have no place in the gRPC Chat message) and go on as token ids; their
answers are read back into reasoning, content and tool calls as the server's
--reasoning-parser and --tool-call-parser say (openai_api.ChoiceOutput).

A client that disconnects aborts its request: handler cancellation is on, so the
handler task is cancelled, the generator closes, and its `finally` cancels the
scheduler call, which frees the KV pages at once.

/metrics is the tokenizer's own registry (requests by outcome, TTFT, inter-token
latency) followed by the scheduler's text exposition, fetched on each scrape
over the scheduler channel (contract.SCRAPE_METHOD): one scrape target for the
whole stack.
"""
from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
from aiohttp import web

from llmrpc.services.auth import Security, bearer_ok
from llmrpc.services.contract import SCRAPE_METHOD
from llmrpc.services.status import StatusError
from llmrpc.services.tokenizer.openai_api import Answer, ApiError, ChoiceOutput, ParsedRequest, choice_outputs
from llmrpc.services.tokenizer.openai_api import models_json, parse_body
from llmrpc.services.tokenizer.reasoning import ReasoningParser, reasoning_parser
from llmrpc.services.tokenizer.server import TokenizerServer
from llmrpc.services.tokenizer.template import PromptBuilder
from llmrpc.services.tokenizer.tool_parsers import ToolParser, parser_for

log = logging.getLogger("llmrpc.tokenizer.http")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 2.0


def _error(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


class OpenAIRoutes:
    """The handlers; they hold the tokenizer server handle, nothing per request."""

    def __init__(self, front: TokenizerServer) -> None:
        self._front = front
        self._servicer = front.servicer
        self._scrape = front.channel.unary_unary(SCRAPE_METHOD)  # raw bytes both ways
        self._model_name: str | None = None
        self._created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ]

    async def health(self, request: web.Request) -> web.Response:
        if self._front.serving:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving\n")

    async def metrics(self, request: web.Request) -> web.Response:
        text = self._servicer.metrics.exposition()
        try:
            text += await self._scrape(b"", timeout=SCRAPE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the front door's own numbers still count
            log.debug("scheduler metrics unavailable: %s", exc.code().name)
        return web.Response(body=text, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        try:
            info = await self._servicer.model_info(timeout=10)
        except StatusError as exc:
            return _error(ApiError.from_error(exc, chat=False))
        self._model_name = info.model_name
        return web.json_response(models_json(info, self._created))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _served_model(self, asked: object) -> str:
        if self._model_name is None or (asked is not None and asked != self._model_name):
            try:  # fetched once, and again when a client names another model (the worker may have changed)
                self._model_name = (await self._servicer.model_info(timeout=10)).model_name
            except StatusError as exc:
                raise ApiError.from_error(exc, chat=False) from None
        if asked is not None and asked != self._model_name:
            raise ApiError(404, f"The model {asked!r} does not exist; this server serves {self._model_name!r}",
                           "model", "model_not_found")
        return self._model_name

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON") from None
            parsed = parse_body(body, chat)
            model = await self._served_model(parsed.model)
            outputs = self._render(parsed)
        except StatusError as exc:
            return _error(ApiError.from_error(exc, chat))
        except ApiError as exc:
            return _error(exc)
        tokenizer = self._servicer.prompts.tokenizer if self._servicer.prompts else None
        answer = Answer(parsed, model, lambda t: tokenizer.decode([t]) if tokenizer else "", outputs)
        responses = self._servicer.generate(parsed.request)
        if not parsed.stream:
            try:
                async with contextlib.aclosing(responses):
                    merged = [r async for r in responses]
            except StatusError as exc:
                return _error(ApiError.from_error(exc, chat, parsed.constraint_param))
            return web.json_response(answer.complete(merged))
        return await self._stream(request, responses, answer)

    def _render(self, parsed: ParsedRequest) -> Callable[[], ChoiceOutput] | None:
        """A chat's prompt rendered into the request as token ids; how its answer is read (None: as text)."""
        prompts = self._servicer.prompts
        if parsed.prompt is None or prompts is None:  # still loading: generate says so
            return None
        chat = parsed.prompt
        text = prompts.render_chat(chat.messages, tools=chat.tools, template_kwargs=chat.template_kwargs)
        parsed.request.ClearField("chat")
        parsed.request.tokens.ids.extend(prompts.encode_rendered(text))
        tools, reasoning = self._readers(prompts)
        return choice_outputs(parsed, text, tools, reasoning)

    def _readers(self, prompts: PromptBuilder) -> tuple[ToolParser, ReasoningParser | None]:
        """The server's tool-call parser (for tool_choice auto) and reasoning parser, read from the flags and
        (for `auto`) the model's chat template."""
        config, template = self._front.config, prompts.tokenizer.chat_template
        return parser_for(config.tool_call_parser, template), reasoning_parser(config.reasoning_parser, template)

    async def _stream(self, request: web.Request, responses, answer: Answer) -> web.StreamResponse:
        """Server-sent events: one chunk per message, then usage if asked, then [DONE]."""
        out: web.StreamResponse | None = None

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await out.write(f"data: {data}\n\n".encode())

        async with contextlib.aclosing(responses):
            try:
                async for r in responses:
                    if out is None:  # headers go out with the first chunk, so early errors stay HTTP errors
                        out = await self._open_stream(request)
                    await send(answer.chunk(r))
            except StatusError as exc:
                error = ApiError.from_error(exc, answer.parsed.chat, answer.parsed.constraint_param)
                if out is None:
                    return _error(error)
                await send(error.body())  # the status line is gone; OpenAI streams errors as a data event
                await out.write_eof()
                return out
            except ConnectionResetError:  # the client left; aclosing aborts the request
                return out
        if out is None:
            out = await self._open_stream(request)
        if answer.parsed.include_usage:
            await send(answer.usage_chunk())
        await send("[DONE]")
        await out.write_eof()
        return out

    @staticmethod
    async def _open_stream(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        return out


def _auth_middleware(api_key: str | None) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        # /health stays open, as gRPC health does: load balancers probe it without a key.
        if request.path != "/health" and not bearer_ok(request.headers.get("Authorization"), api_key):
            return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key"))
        return await handler(request)

    return check


@dataclass
class HttpServer:
    """A started HTTP front door: its bound port and `stop()`."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(front: TokenizerServer, host: str, port: int, security: Security) -> HttpServer:
    """Binds host:port (0: any free port) and serves the OpenAI routes for `front`."""
    app = web.Application(middlewares=[_auth_middleware(security.api_key)])
    app.add_routes(OpenAIRoutes(front).routes())
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    ssl_context = None
    if security.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(security.tls_cert, security.tls_key)
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("OpenAI-compatible HTTP on %s:%d", host, bound)
    return HttpServer(runner, bound)
