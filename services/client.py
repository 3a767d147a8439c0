"""Client side of the public API: what `llmrpc generate`, `llmrpc chat` and health checks call.

Everything here speaks to any `llmrpc.v1.Generation` front door (the tokenizer
service) over gRPC, exactly as a third-party client would.
"""
from __future__ import annotations

import asyncio
import sys
from typing import AsyncIterator, Sequence, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmrpc.services import rpc
from llmrpc.v1 import generation_pb2, generation_pb2_grpc

Messages = Sequence[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


def check_health(target: str, timeout: float = 3.0, service: str = "",
                 root_certificates: bytes | None = None) -> bool:
    """True when `target` answers grpc.health.v1 Check with SERVING (blocking; for probes).

    `root_certificates`: the port speaks TLS and its certificate chains to these roots.
    """
    if root_certificates is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def build_request(
    prompt: str | Messages, *, chat: bool = True, request_id: str = "", stream: bool = True, **sampling
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest: `prompt` as chat (a string becomes one user message) or raw text.

    `sampling` takes SamplingParams fields by name (max_tokens=, temperature=, stop=[...]);
    a None value leaves the field unset, i.e. at the server's default.
    """
    params = generation_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=params, stream=stream)
    if isinstance(prompt, str) and not chat:
        request.text = prompt
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        request.chat.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    return request


async def generate_text(
    target: str, prompt: str | Messages, *, chat: bool = True, **sampling
) -> AsyncIterator[str]:
    """Streams the completion's text pieces as they arrive (index 0; n is left at 1)."""
    async with rpc.channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        async for response in stub.Generate(build_request(prompt, chat=chat, **sampling)):
            if response.text:
                yield response.text


async def chat_repl(
    target: str,
    *,
    system: str | None = None,
    input_stream: TextIO | None = None,
    output: TextIO | None = None,
    **sampling,
) -> list[dict[str, str]]:
    """Multi-turn chat on a terminal: `/reset` clears the history, `/exit` or EOF quits.

    Streams each reply as it comes and keeps it in the history, which is returned at the end.
    `input_stream` defaults to the terminal (with line editing), `output` to stdout.
    """
    output = output or sys.stdout
    fresh = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(fresh)

    async def read_line() -> str | None:
        if input_stream is None:
            try:
                return await asyncio.to_thread(input, "> ")
            except EOFError:
                return None
        output.write("> ")
        output.flush()
        line = await asyncio.to_thread(input_stream.readline)
        return line.rstrip("\n") if line else None

    output.write("chat with the model: /reset clears the conversation, /exit or Ctrl-D quits\n")
    while True:
        line = await read_line()
        if line is None or line.strip() == "/exit":
            output.write("\n" if line is None else "")
            return history
        if line.strip() == "/reset":
            history = list(fresh)
            output.write("(conversation cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            async for piece in generate_text(target, history, **sampling):
                reply.append(piece)
                output.write(piece)
                output.flush()
        except grpc.aio.AioRpcError as exc:
            history.pop()  # the turn did not happen; the user can retry it
            output.write(f"\n[error: {exc.code().name}: {exc.details()}]\n")
            continue
        output.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
