"""The tokenizer service over real gRPC on loopback, in front of a replaying token-level scheduler.

`ReplayScheduler` serves the scheduler's side of the contract (token-level
`Generation`, health) and streams a fixed continuation, so these tests pin down the
tokenizer's own behaviour: what it sends upstream, the text it streams back, stop
strings and cancellation, errors and health. The whole stack is tested end to end
with the real scheduler in tests/services.
"""
from __future__ import annotations

import asyncio
import io
import socket
from dataclasses import dataclass, field

import grpc
import pytest

from llmrpc.services import rpc
from llmrpc.services.client import build_request, chat_repl, check_health, generate_text
from llmrpc.services.tokenizer.server import TokenizerConfig, start
from llmrpc.v1 import generation_pb2, generation_pb2_grpc

CONTINUATION = "Paris is the capital of France 🇫🇷.\nUser: and Spain? Madrid, of course, and that is all."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ReplayScheduler(generation_pb2_grpc.GenerationServicer):
    """Answers every request with `continuation`, one token per message."""

    continuation: list[int]
    delay_s: float = 0.002
    requests: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    sent: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.WhichOneof("input") != "tokens":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the scheduler takes tokens only")
        if 99999 in request.tokens.ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tokens.ids[0] = 99999 is out of range")
        n = request.sampling.n if request.sampling.HasField("n") else 1
        try:
            for k, token in enumerate(self.continuation):
                for index in range(n):
                    response = generation_pb2.GenerateResponse(request_id=request.request_id, index=index, token_ids=[token])
                    if k == len(self.continuation) - 1:
                        response.finish_reason = generation_pb2.FINISH_REASON_LENGTH
                        response.usage.CopyFrom(generation_pb2.Usage(
                            prompt_tokens=len(request.tokens.ids), completion_tokens=k + 1, cached_prompt_tokens=3))
                    self.sent += 1
                    yield response
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(architecture="LlamaForCausalLM", context_length=8192,
                                        vocab_size=49152, eos_token_ids=[2], tp_size=1)


async def start_scheduler(replay: ReplayScheduler, port: int = 0) -> rpc.Server:
    server = await rpc.start_server(
        f"127.0.0.1:{port}",
        [lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(replay, s)],
        ["llmrpc.v1.Generation"],
    )
    await server.set_serving(True)
    return server


@pytest.fixture(scope="module")
def continuation(tokenizer) -> list[int]:
    return tokenizer.encode(CONTINUATION, add_special_tokens=False)


def with_stack(tokenizer, continuation, test, delay_s: float = 0.002, **config):
    """Runs `test(stub, replay, handle)` against a replay scheduler and a tokenizer service."""

    async def main():
        replay = ReplayScheduler(continuation, delay_s)
        scheduler = await start_scheduler(replay)
        handle = await start(TokenizerConfig(model_path="/models/SmolLM2-135M-Instruct", port=0,
                                             scheduler=f"127.0.0.1:{scheduler.port}",
                                             health_poll_interval_s=0.05, **config), tokenizer)
        try:
            await handle.wait_serving(True, timeout=10)
            async with rpc.channel(f"127.0.0.1:{handle.port}") as channel:
                await test(generation_pb2_grpc.GenerationStub(channel), replay, handle)
        finally:
            await handle.stop(0)
            await scheduler.stop(0)

    asyncio.run(main())


async def collect(stub, request) -> list[generation_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(request)]


def test_streams_text_and_tokens(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        request = build_request("Hello", chat=False, max_tokens=64, temperature=0.0, stop_token_ids=[2])
        responses = await collect(stub, request)
        upstream = replay.requests[0]
        assert list(upstream.tokens.ids) == tokenizer.encode("Hello")
        assert upstream.sampling.max_tokens == 64 and upstream.sampling.temperature == 0.0
        assert list(upstream.sampling.stop_token_ids) == [2]
        assert upstream.stream and upstream.request_id  # an id was assigned
        assert {r.request_id for r in responses} == {upstream.request_id}
        assert len(responses) == len(continuation)
        assert "".join(r.text for r in responses) == CONTINUATION
        assert [t for r in responses for t in r.token_ids] == continuation
        assert not any("\ufffd" in r.text for r in responses)
        assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert responses[-1].usage == generation_pb2.Usage(
            prompt_tokens=len(upstream.tokens.ids), completion_tokens=len(continuation), cached_prompt_tokens=3)

    with_stack(tokenizer, continuation, test)


def test_stop_string_cuts_text_and_cancels_the_scheduler_call(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        request = build_request("Hello", chat=False, request_id="req-1", stop=["\nUser:", "never"])
        responses = await collect(stub, request)
        assert list(replay.requests[0].sampling.stop) == []  # stop strings stay in the tokenizer
        assert replay.requests[0].request_id == "req-1"
        assert "".join(r.text for r in responses) == "Paris is the capital of France 🇫🇷."
        assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
        consumed = len([t for r in responses for t in r.token_ids])
        assert responses[-1].usage.completion_tokens == consumed
        assert consumed < len(continuation)
        await asyncio.wait_for(replay.cancelled.wait(), 5)
        assert replay.sent < len(continuation)

    with_stack(tokenizer, continuation, test, delay_s=0.02)


def test_stream_false_returns_one_message_per_index(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        request = build_request("Hello", chat=False, stream=False, n=2, stop=["Madrid"])
        responses = await collect(stub, request)
        assert [r.index for r in responses] == [0, 1]
        want = CONTINUATION[: CONTINUATION.index("Madrid")]
        for r in responses:
            assert r.text == want
            assert r.finish_reason == generation_pb2.FINISH_REASON_STOP
            assert tokenizer.decode(list(r.token_ids)).startswith(want)
        await asyncio.wait_for(replay.cancelled.wait(), 5)

    with_stack(tokenizer, continuation, test)


def test_chat_is_templated_and_text_input_never_reaches_the_scheduler(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
        pieces = [p async for p in generate_text(f"127.0.0.1:{handle.port}", messages, max_tokens=8)]
        assert "".join(pieces) == CONTINUATION
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(replay.requests[0].tokens.ids) == list(want["input_ids"])

    with_stack(tokenizer, continuation, test)


@pytest.mark.parametrize(
    "request_,code,message",
    [
        (build_request([{"role": "robot", "content": "hi"}]), grpc.StatusCode.INVALID_ARGUMENT,
         "chat.messages[0].role is 'robot'"),
        (build_request("", chat=False), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        (generation_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input: set one of"),
        (build_request("hi", stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[1] is empty"),
        # The scheduler's own refusals come back with their status and message.
        (generation_pb2.GenerateRequest(tokens=generation_pb2.TokenIds(ids=[99999])),
         grpc.StatusCode.INVALID_ARGUMENT, "tokens.ids[0] = 99999 is out of range"),
    ],
)
def test_bad_requests_are_refused_with_the_field(tokenizer, continuation, request_, code, message) -> None:
    async def test(stub, replay, handle):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(stub, request_)
        assert error.value.code() == code
        assert message in error.value.details()

    with_stack(tokenizer, continuation, test)


def test_client_cancel_cancels_the_scheduler_call(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        call = stub.Generate(build_request("Hello", chat=False))
        first = await call.read()
        assert first.text == "Paris"
        call.cancel()
        await asyncio.wait_for(replay.cancelled.wait(), 5)
        assert replay.sent < len(continuation)

    with_stack(tokenizer, continuation, test, delay_s=0.05)


def test_chat_repl_keeps_history_resets_and_exits(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        typed = io.StringIO("Hi\n\nAnd Spain?\n/reset\nAgain\n/exit\nnever read\n")
        shown = io.StringIO()
        history = await chat_repl(f"127.0.0.1:{handle.port}", input_stream=typed, output=shown, max_tokens=8)
        assert shown.getvalue().count(CONTINUATION + "\n") == 3
        assert "(conversation cleared)" in shown.getvalue()
        turns = [
            [{"role": "user", "content": "Hi"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": CONTINUATION},
             {"role": "user", "content": "And Spain?"}],
            [{"role": "user", "content": "Again"}],
        ]
        assert len(replay.requests) == 3
        for request, messages in zip(replay.requests, turns):
            want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert list(request.tokens.ids) == list(want["input_ids"])
            assert request.sampling.max_tokens == 8
        assert history == [*turns[2], {"role": "assistant", "content": CONTINUATION}]

    with_stack(tokenizer, continuation, test)


def test_model_info_passes_through_with_the_model_name(tokenizer, continuation) -> None:
    async def test(stub, replay, handle):
        info = await stub.GetModelInfo(generation_pb2.GetModelInfoRequest())
        assert info == generation_pb2.ModelInfo(
            model_name="SmolLM2-135M-Instruct", architecture="LlamaForCausalLM", context_length=8192,
            vocab_size=49152, eos_token_ids=[2], tp_size=1)

    with_stack(tokenizer, continuation, test)


def test_health_follows_the_scheduler(tokenizer, continuation) -> None:
    async def main():
        port = free_port()
        handle = await start(TokenizerConfig(model_path="unused", port=0, scheduler=f"127.0.0.1:{port}",
                                             health_poll_interval_s=0.05), tokenizer)
        target = f"127.0.0.1:{handle.port}"
        try:
            await asyncio.sleep(0.3)  # several polls with no scheduler
            assert not handle.serving
            assert not await asyncio.to_thread(check_health, target, 2.0)
            async with rpc.channel(target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await collect(generation_pb2_grpc.GenerationStub(channel), build_request("hi"))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"scheduler at 127.0.0.1:{port}" in error.value.details()

            scheduler = await start_scheduler(ReplayScheduler(continuation), port)
            await handle.wait_serving(True, timeout=10)
            assert await asyncio.to_thread(check_health, target, 2.0)
            await scheduler.set_serving(False)
            await handle.wait_serving(False, timeout=10)
            assert not await asyncio.to_thread(check_health, target, 2.0)
            await scheduler.set_serving(True)
            await handle.wait_serving(True, timeout=10)
            await scheduler.stop(0)
            await handle.wait_serving(False, timeout=10)
        finally:
            await handle.stop(0)

    asyncio.run(main())


def test_unloadable_tokenizer_stops_the_service(tmp_path) -> None:
    async def main():
        handle = await start(TokenizerConfig(model_path=str(tmp_path), port=0, scheduler="127.0.0.1:1"))
        with pytest.raises(RuntimeError, match="cannot load the tokenizer"):
            await asyncio.wait_for(handle.wait_for_termination(), 30)
        await handle.stop(0)

    asyncio.run(main())
