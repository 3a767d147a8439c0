"""The tokenizer service over real gRPC on loopback, in front of the real scheduler and worker.

Most tests talk to the tokenizer of the session's `llmrpc serve` stack (the default
model). Tests that watch the tokenizer itself (health, naming, loading) start one
in-process with `start(TokenizerConfig(...))` in front of that stack's scheduler.
Decoding is greedy, so every expectation is computed from the stack's own output
(or the scheduler's, for the same token ids) — no model text is written down here.
That the scheduler really dropped a request the tokenizer cancelled is shown by
reusing its request id: the scheduler refuses an id while a request holds it.
"""
from __future__ import annotations

import asyncio
import io
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from llmrpc.services import rpc
from llmrpc.services.client import build_request, chat_repl, check_health, generate_text
from llmrpc.services.rpc import free_port
from llmrpc.services.tokenizer.server import TokenizerConfig, start
from llmrpc.v1 import generation_pb2, generation_pb2_grpc

PROMPT = "The three most important inventions of the nineteenth century were"
REFERENCE_TOKENS = 40
LONG = 4000  # max_tokens of requests that must be cut short: minutes of decoding on a CPU


async def collect(target: str, request: generation_pb2.GenerateRequest) -> list[generation_pb2.GenerateResponse]:
    async with rpc.channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return [r async for r in stub.Generate(request, timeout=120)]


async def model_info(target: str) -> generation_pb2.ModelInfo:
    async with rpc.channel(target) as channel:
        return await generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
            generation_pb2.GetModelInfoRequest(), timeout=10)


def tokens_of(responses: list[generation_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def greedy_raw(request_id: str = "", **sampling) -> generation_pb2.GenerateRequest:
    """PROMPT as raw text, greedy, EOS ignored: the same token stream whatever max_tokens is."""
    return build_request(PROMPT, chat=False, request_id=request_id, temperature=0.0, ignore_eos=True, **sampling)


def fresh_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def reuse_request_id(scheduler: str, request_id: str, prompt: list[int], n: int = 1,
                           timeout: float = 10.0) -> list[generation_pb2.GenerateResponse]:
    """Sends a short request under `request_id` straight to the scheduler, retrying while the id is in use.

    Succeeds only once the scheduler has dropped the earlier request of that id.
    """
    request = generation_pb2.GenerateRequest(
        request_id=request_id, tokens=generation_pb2.TokenIds(ids=prompt),
        sampling=generation_pb2.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, n=n))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await collect(scheduler, request)
        except grpc.aio.AioRpcError as exc:
            if "in use" not in exc.details() or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def assert_served_short(responses: list[generation_pb2.GenerateResponse], n: int = 1) -> None:
    last = {r.index: r for r in responses}
    assert sorted(last) == list(range(n))
    for r in last.values():
        assert r.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert r.usage.completion_tokens == 2


@dataclass(frozen=True)
class Reference:
    """The stack's own greedy continuation of PROMPT, one streamed message per token."""

    prompt_ids: list[int]
    tokens: list[int]
    pieces: list[str]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def stop_string(self) -> tuple[str, int]:
        """A stop string that straddles a token boundary mid-text, and where its first occurrence starts."""
        text = self.text
        boundary = 0
        for piece in self.pieces:
            boundary += len(piece)
            if boundary < len(text) // 3 or not piece:
                continue
            stop = text[boundary - 2: boundary + 3]
            if len(stop) == 5 and text.find(stop) == boundary - 2:
                return stop, boundary - 2
        raise AssertionError(f"no stop string candidate in {text!r}")


@pytest.fixture(scope="module")
def reference(default_stack, tokenizer) -> Reference:
    responses = asyncio.run(collect(default_stack.tokenizer, greedy_raw(max_tokens=REFERENCE_TOKENS)))
    assert [len(r.token_ids) for r in responses] == [1] * REFERENCE_TOKENS
    return Reference(tokenizer.encode(PROMPT), tokens_of(responses), [r.text for r in responses])


def test_streams_text_and_tokens(default_stack, tokenizer, reference) -> None:
    responses = asyncio.run(collect(default_stack.tokenizer, greedy_raw(max_tokens=REFERENCE_TOKENS)))
    # What the tokenizer sent upstream: exactly the scheduler's answer to the encoded prompt.
    direct = asyncio.run(collect(default_stack.scheduler, generation_pb2.GenerateRequest(
        tokens=generation_pb2.TokenIds(ids=reference.prompt_ids),
        sampling=generation_pb2.SamplingParams(max_tokens=REFERENCE_TOKENS, temperature=0.0, ignore_eos=True))))
    assert tokens_of(responses) == tokens_of(direct) == reference.tokens
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id  # an id was assigned
    assert len(responses) == REFERENCE_TOKENS
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode(reference.tokens, skip_special_tokens=True)
    assert not any("\ufffd" in r.text for r in responses)
    assert [r.finish_reason for r in responses[:-1]] == [generation_pb2.FINISH_REASON_UNSPECIFIED] * (REFERENCE_TOKENS - 1)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.prompt_tokens == len(reference.prompt_ids)
    assert responses[-1].usage.completion_tokens == REFERENCE_TOKENS
    assert responses[-1].usage == direct[-1].usage


def test_sampling_reaches_the_scheduler(default_stack, reference) -> None:
    """stop_token_ids travel upstream (the scheduler ends the request on the token)."""
    k = len(reference.tokens) // 2
    stop_token = reference.tokens[k]
    first = reference.tokens.index(stop_token)  # its first occurrence, k or earlier
    responses = asyncio.run(collect(default_stack.tokenizer,
                                    greedy_raw(max_tokens=REFERENCE_TOKENS, stop_token_ids=[stop_token])))
    assert tokens_of(responses) == reference.tokens[: first + 1]
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert responses[-1].usage.completion_tokens == first + 1


def test_stop_string_cuts_text_and_frees_the_scheduler_request(default_stack, tokenizer, reference) -> None:
    stop, cut = reference.stop_string()
    request_id = fresh_id()

    async def test():
        # Stop strings stay in the tokenizer: the scheduler would refuse them (it has no text).
        responses = await collect(default_stack.tokenizer,
                                  greedy_raw(request_id, max_tokens=LONG, stop=[stop, "\x00never\x00"]))
        # The scheduler forgets the request once the tokenizer cancels its call, so its id is free again.
        again = await reuse_request_id(default_stack.scheduler, request_id, reference.prompt_ids)
        return responses, again

    responses, again = asyncio.run(test())
    assert {r.request_id for r in responses} == {request_id}
    assert "".join(r.text for r in responses) == reference.text[:cut]
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    consumed = tokens_of(responses)
    assert consumed == reference.tokens[: len(consumed)]
    assert responses[-1].usage.completion_tokens == len(consumed)
    assert responses[-1].usage.prompt_tokens == len(reference.prompt_ids)
    assert tokenizer.decode(consumed, skip_special_tokens=True).startswith(reference.text[:cut] + stop)
    assert len(consumed) < REFERENCE_TOKENS  # far below max_tokens: the generation was cut, not run out
    assert_served_short(again)


def test_a_stop_string_finish_reports_the_cached_prompt_tokens(default_stack, tokenizer) -> None:
    """The tokenizer ends the request itself, before the scheduler's last message: usage is still whole."""
    # Several full KV pages, which the prefix cache keeps.
    prompt = ("The printing press came to Europe in the fifteenth century, when Gutenberg combined movable "
              "metal type, oil-based ink and a screw press. Within fifty years presses ran in more than two "
              "hundred cities. In two sentences, explain why this mattered to science:")

    def request(**sampling) -> generation_pb2.GenerateRequest:
        return build_request(prompt, chat=False, temperature=0.0, ignore_eos=True, **sampling)

    async def test():
        first = await collect(default_stack.tokenizer, request(max_tokens=REFERENCE_TOKENS))
        warm = await collect(default_stack.tokenizer, request(max_tokens=REFERENCE_TOKENS))
        reference = Reference(tokenizer.encode(prompt), tokens_of(warm), [r.text for r in warm])
        stop, cut = reference.stop_string()
        return first, warm, reference, cut, await collect(default_stack.tokenizer, request(max_tokens=LONG, stop=[stop]))

    first, warm, reference, cut, stopped = asyncio.run(test())
    assert tokens_of(first) == reference.tokens
    cached = warm[-1].usage.cached_prompt_tokens
    assert cached >= 32 and warm[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    last = stopped[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP and "".join(r.text for r in stopped) == reference.text[:cut]
    assert len(tokens_of(stopped)) < REFERENCE_TOKENS  # cut by the tokenizer, not by max_tokens
    assert last.usage == generation_pb2.Usage(prompt_tokens=len(reference.prompt_ids),
                                              completion_tokens=len(tokens_of(stopped)), cached_prompt_tokens=cached)
    assert [r.HasField("usage") for r in stopped] == [False] * (len(stopped) - 1) + [True]


def test_stream_false_returns_one_message_per_index(default_stack, tokenizer, reference) -> None:
    stop, cut = reference.stop_string()
    request_id = fresh_id()

    async def test():
        responses = await collect(default_stack.tokenizer,
                                  greedy_raw(request_id, stream=False, n=2, max_tokens=LONG, stop=[stop]))
        again = await reuse_request_id(default_stack.scheduler, request_id, reference.prompt_ids, n=2)
        return responses, again

    responses, again = asyncio.run(test())
    assert [r.index for r in responses] == [0, 1]
    for r in responses:
        assert r.request_id == request_id
        assert r.text == reference.text[:cut]
        assert r.finish_reason == generation_pb2.FINISH_REASON_STOP
        assert list(r.token_ids) == reference.tokens[: len(r.token_ids)]
        assert r.usage.completion_tokens == len(r.token_ids) < REFERENCE_TOKENS
        assert tokenizer.decode(list(r.token_ids), skip_special_tokens=True).startswith(r.text + stop)
    assert_served_short(again, n=2)


def test_chat_is_templated_before_it_reaches_the_scheduler(default_stack, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    templated = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])

    async def test():
        pieces = [p async for p in generate_text(default_stack.tokenizer, messages, max_tokens=8, temperature=0.0)]
        responses = await collect(default_stack.tokenizer, build_request(messages, max_tokens=8, temperature=0.0))
        direct = await collect(default_stack.scheduler, generation_pb2.GenerateRequest(
            tokens=generation_pb2.TokenIds(ids=templated),
            sampling=generation_pb2.SamplingParams(max_tokens=8, temperature=0.0)))
        return pieces, responses, direct

    pieces, responses, direct = asyncio.run(test())
    assert tokens_of(responses) == tokens_of(direct)
    assert responses[-1].usage.prompt_tokens == len(templated)
    want = tokenizer.decode(tokens_of(direct), skip_special_tokens=True)
    assert want and "".join(pieces) == "".join(r.text for r in responses) == want


@pytest.mark.parametrize(
    "request_,message",
    [
        (build_request([{"role": "robot", "content": "hi"}]), "chat.messages[0].role is 'robot'"),
        (build_request("", chat=False), "text is empty"),
        (generation_pb2.GenerateRequest(), "input: set one of"),
        (build_request("hi", stop=["ok", ""]), "sampling.stop[1] is empty"),
        (generation_pb2.GenerateRequest(tokens=generation_pb2.TokenIds()), "tokens.ids is empty"),
        # The scheduler's own refusals come back through the tokenizer with their status and message.
        (generation_pb2.GenerateRequest(tokens=generation_pb2.TokenIds(ids=[99999])),
         "tokens.ids[0] = 99999 is outside the vocabulary"),
        (build_request("hi", top_k=-7), "sampling.top_k"),
    ],
)
def test_bad_requests_are_refused_with_the_field(default_stack, request_, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(collect(default_stack.tokenizer, request_))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_client_cancel_frees_the_scheduler_request(default_stack, reference) -> None:
    request_id = fresh_id()

    async def test():
        async with rpc.channel(default_stack.tokenizer) as channel:
            call = generation_pb2_grpc.GenerationStub(channel).Generate(greedy_raw(request_id, max_tokens=LONG))
            first = await call.read()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
        again = await reuse_request_id(default_stack.scheduler, request_id, reference.prompt_ids)
        return first, again

    first, again = asyncio.run(test())
    assert first.request_id == request_id
    assert list(first.token_ids) == reference.tokens[:1]
    assert first.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED
    assert_served_short(again)


def test_chat_repl_keeps_history_resets_and_exits(default_stack) -> None:
    target = default_stack.tokenizer

    async def reply(messages: list[dict[str, str]]) -> str:
        return "".join([p async for p in generate_text(target, messages, max_tokens=8, temperature=0.0)])

    async def test():
        typed = io.StringIO("Hi\n\nAnd Spain?\n/reset\nAgain\n/exit\nnever read\n")
        shown = io.StringIO()
        history = await chat_repl(target, input_stream=typed, output=shown, max_tokens=8, temperature=0.0)
        first = await reply([{"role": "user", "content": "Hi"}])
        second = await reply([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "And Spain?"}])
        without_history = await reply([{"role": "user", "content": "And Spain?"}])
        third = await reply([{"role": "user", "content": "Again"}])
        return typed.read(), shown.getvalue(), history, (first, second, without_history, third)

    unread, shown, history, (first, second, without_history, third) = asyncio.run(test())
    assert second != without_history  # so the transcript below proves the history was sent
    assert shown == (
        "chat with the model: /reset clears the conversation, /exit or Ctrl-D quits\n"
        f"> {first}\n> > {second}\n> (conversation cleared)\n> {third}\n> "
    )
    assert history == [{"role": "user", "content": "Again"}, {"role": "assistant", "content": third}]
    assert unread == "never read\n"


def test_model_info_passes_through(default_stack) -> None:
    info = asyncio.run(model_info(default_stack.tokenizer))
    assert info == asyncio.run(model_info(default_stack.scheduler))
    assert info.model_name == "SmolLM2-135M-Instruct"


def test_configured_model_name_replaces_the_schedulers(default_stack, tokenizer) -> None:
    async def test():
        handle = await start(TokenizerConfig(model_path="unused", port=0, scheduler=default_stack.scheduler,
                                             model_name="house-model", health_poll_interval_s=0.05), tokenizer)
        try:
            await handle.wait_serving(True, timeout=20)
            return await model_info(f"127.0.0.1:{handle.port}"), await model_info(default_stack.scheduler)
        finally:
            await handle.stop(0)

    info, upstream = asyncio.run(test())
    upstream.model_name = "house-model"
    assert info == upstream


@dataclass
class TcpForwarder:
    """Relays TCP connections from a local port to a target; `stop()` cuts every one (a network fault)."""

    port: int
    target: tuple[str, int]
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        upstream = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


def test_health_follows_the_scheduler(default_stack, tokenizer, reference) -> None:
    """NOT_SERVING with nothing at the scheduler address, SERVING through to the real one, and back."""
    host, port = default_stack.scheduler.rsplit(":", 1)

    async def main():
        relay_port = free_port()
        handle = await start(TokenizerConfig(model_path="unused", port=0, scheduler=f"127.0.0.1:{relay_port}",
                                             health_poll_interval_s=0.05), tokenizer)
        target = f"127.0.0.1:{handle.port}"
        relay = TcpForwarder(relay_port, (host, int(port)))
        try:
            await asyncio.sleep(0.3)  # several polls with no scheduler
            assert not handle.serving
            assert not await asyncio.to_thread(check_health, target, 2.0)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await collect(target, build_request("hi", max_tokens=2))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"scheduler at 127.0.0.1:{relay_port}" in error.value.details()

            await relay.start()  # the real scheduler is now reachable at that address
            await handle.wait_serving(True, timeout=30)
            assert await asyncio.to_thread(check_health, target, 2.0)
            through = await collect(target, greedy_raw(max_tokens=REFERENCE_TOKENS))
            assert tokens_of(through) == reference.tokens
            assert "".join(r.text for r in through) == reference.text

            await relay.stop()  # the scheduler becomes unreachable
            await handle.wait_serving(False, timeout=30)
            assert not await asyncio.to_thread(check_health, target, 2.0)

            await relay.start()
            await handle.wait_serving(True, timeout=30)
            assert await asyncio.to_thread(check_health, target, 2.0)
        finally:
            if relay.running:
                await relay.stop()
            await handle.stop(0)

    asyncio.run(main())


def test_unloadable_tokenizer_stops_the_service(tmp_path) -> None:
    async def main():
        handle = await start(TokenizerConfig(model_path=str(tmp_path), port=0, scheduler="127.0.0.1:1"))
        with pytest.raises(RuntimeError, match="cannot load the tokenizer"):
            await asyncio.wait_for(handle.wait_for_termination(), 30)
        await handle.stop(0)

    asyncio.run(main())
