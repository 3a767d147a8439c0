"""End to end through the real three-process stack (`llmrpc serve`) on the default model."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch

from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 11?",
    "Give me a name for a friendly robot.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_reference(default_model_dir: Path):
    """transformers' own GGUF loading of the same file, and its greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmrpc.engine.default_model import ensure_default_gguf
    from llmrpc.services.cli import default_cache_dir

    gguf = ensure_default_gguf(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    reference = {}
    for prompt in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        reference[prompt] = (ids[0].tolist(), out[0, ids.shape[1]:].tolist())
    return reference


def _chat_request(prompt: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=prompt)]),
        sampling=pb.SamplingParams(**sampling),
    )


async def _collect(target: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        return [r async for r in stub.Generate(request, timeout=120)]


async def _collect_many(target: str, requests: list[pb.GenerateRequest]) -> list[list[pb.GenerateResponse]]:
    return await asyncio.gather(*(_collect(target, r) for r in requests))


def test_greedy_chat_is_token_identical_to_transformers(default_stack, hf_reference) -> None:
    # All 8 at once: they share batches, so this also proves batching changes nothing.
    requests = [_chat_request(p, max_tokens=NEW_TOKENS, temperature=0.0) for p in CHAT_PROMPTS]
    results = asyncio.run(_collect_many(default_stack.tokenizer, requests))
    for prompt, responses in zip(CHAT_PROMPTS, results):
        prompt_ids, expected = hf_reference[prompt]
        got = [t for r in responses for t in r.token_ids]
        assert got == expected, f"{prompt!r}: stack {got} != transformers {expected}"
        last = responses[-1]
        assert last.usage.prompt_tokens == len(prompt_ids)
        assert last.usage.completion_tokens == len(expected)
        eos_stop = expected[-1] in (2,) and len(expected) < NEW_TOKENS
        assert last.finish_reason == (pb.FINISH_REASON_STOP if eos_stop else pb.FINISH_REASON_LENGTH)


def test_scheduler_tokens_match_tokenizer_tokens(default_stack, hf_reference) -> None:
    """The scheduler serves the same Generation API at token level."""
    prompt = CHAT_PROMPTS[0]
    prompt_ids, expected = hf_reference[prompt]
    request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt_ids),
                                 sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    responses = asyncio.run(_collect(default_stack.scheduler, request))
    assert [t for r in responses for t in r.token_ids] == expected
    assert all(r.request_id == responses[0].request_id != "" for r in responses)


def test_streamed_text_concatenates_to_final_text(default_stack) -> None:
    prompt = "Write two sentences about unicode: include the words café, naïve and 東京."
    streamed = asyncio.run(_collect(default_stack.tokenizer, _chat_request(prompt, max_tokens=48, temperature=0.0)))
    whole = asyncio.run(_collect(default_stack.tokenizer, pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=prompt)]),
        sampling=pb.SamplingParams(max_tokens=48, temperature=0.0), stream=False)))
    assert len(whole) == 1 and len(streamed) > 1
    assert "".join(r.text for r in streamed) == whole[0].text
    assert [t for r in streamed for t in r.token_ids] == list(whole[0].token_ids)
    assert all("\ufffd" not in r.text for r in streamed)


def test_scheduler_refuses_text_input(default_stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_collect(default_stack.scheduler, pb.GenerateRequest(text="hello")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in info.value.details()


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1, -5])), "tokens.ids[1]"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(top_k=-7)), "sampling.top_k"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(temperature=-1)),
     "sampling.temperature"),
    (pb.GenerateRequest(tokens=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(max_tokens=10**7)),
     "max_tokens"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])),
     "chat.messages[0].role"),
])
def test_bad_input_is_invalid_argument_naming_the_field(default_stack, request_, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_collect(default_stack.tokenizer, request_))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_model_info(default_stack) -> None:
    async def ask():
        async with channel(default_stack.tokenizer) as ch:
            return await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    info = asyncio.run(ask())
    assert info.model_name == "SmolLM2-135M-Instruct"
    assert info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == 49152 and info.tp_size == 1
    assert 2 in info.eos_token_ids and info.context_length >= 2048


def test_every_port_serves_health_and_reflection(default_stack) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from llmrpc.services.client import check_health

    expected = {
        default_stack.tokenizer: "llmrpc.v1.Generation",
        default_stack.scheduler: "llmrpc.v1.Generation",
        default_stack.workers[0]: "llmrpc.v1.Worker",
    }
    for target, service in expected.items():
        assert check_health(target)
        with grpc.insecure_channel(target) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_cancel_frees_kv_pages_at_once(tmp_path: Path, default_model_dir: Path) -> None:
    """A cancelled stream's pages come back: a request that needs almost the whole pool runs next."""
    from ..conftest import start_stack

    stack = start_stack(tmp_path, default_model_dir, "--max-total-tokens", "512")  # 32 pages of 16 tokens
    first = pb.GenerateRequest(request_id="cancelled", tokens=pb.TokenIds(ids=list(range(1000, 1100))),
                               sampling=pb.SamplingParams(max_tokens=380, temperature=0.0, ignore_eos=True))
    # (100 + 380 tokens: 30 pages.) The scheduler refuses an id while a request holds it, so a short
    # request under the same id is served only once the cancelled one is gone, not run to its end.
    same_id = pb.GenerateRequest(request_id="cancelled", tokens=pb.TokenIds(ids=[1, 2, 3]),
                                 sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    # 420 + 70 tokens: 31 pages, and its prompt alone (27 pages) does not fit beside the 7 the first holds.
    second = pb.GenerateRequest(tokens=pb.TokenIds(ids=list(range(2000, 2420))),
                                sampling=pb.SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True))

    async def run() -> tuple[list[pb.GenerateResponse], list[pb.GenerateResponse], list[pb.GenerateResponse]]:
        async with channel(stack.scheduler) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            call = stub.Generate(first)
            started = [await call.read() for _ in range(3)]
            call.cancel()
            deadline = time.monotonic() + 5  # running to its end would take 377 more decode steps
            while True:
                try:
                    reused = [r async for r in stub.Generate(same_id, timeout=30)]
                    break
                except grpc.aio.AioRpcError as exc:
                    if "in use" not in exc.details() or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)
            return started, reused, [r async for r in stub.Generate(second, timeout=60)]

    try:
        info = asyncio.run(_model_info(stack.scheduler))
        assert (info.page_size, info.total_kv_tokens) == (16, 512)
        started, reused, responses = asyncio.run(run())
    finally:
        stack.stop()
    assert [len(r.token_ids) for r in started] == [1, 1, 1]
    assert reused[-1].finish_reason == pb.FINISH_REASON_LENGTH and reused[-1].usage.completion_tokens == 2
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in started)
    assert len([t for r in responses for t in r.token_ids]) == 70
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert responses[-1].usage.prompt_tokens == 420 and responses[-1].usage.completion_tokens == 70


async def _model_info(target: str) -> pb.ModelInfo:
    async with channel(target) as ch:
        return await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def test_disable_radix_cache_computes_every_prompt_in_full(tmp_path: Path, tiny_model: Path, tiny_stack) -> None:
    """`--disable-radix-cache`: a repeated prompt reports no cached tokens and still gives the same tokens."""
    from ..conftest import start_stack

    prompt = list(range(100, 260))  # 160 tokens: 10 full pages a prefix cache would share
    request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    def twice(target: str) -> list[tuple[list[int], int]]:
        runs = [asyncio.run(_collect(target, request)) for _ in range(2)]
        return [([t for r in run for t in r.token_ids], run[-1].usage.cached_prompt_tokens) for run in runs]

    cached = twice(tiny_stack.scheduler)
    stack = start_stack(tmp_path, tiny_model, "--disable-radix-cache")
    try:
        naive = twice(stack.scheduler)
        metrics = asyncio.run(_scrape(stack.scheduler))
    finally:
        stack.stop()
    assert cached[1][1] >= 144 and naive[0][1] == naive[1][1] == 0  # the cached run shares 9+ pages
    assert naive[0][0] == naive[1][0] == cached[0][0] == cached[1][0]
    assert "llmrpc_scheduler_cached_prompt_tokens_total 0.0" in metrics
    assert "llmrpc_scheduler_prefill_tokens_total 320.0" in metrics  # both prompts computed in full


async def _scrape(target: str) -> str:
    from llmrpc.services.contract import SCRAPE_METHOD

    async with channel(target) as ch:
        return (await ch.unary_unary(SCRAPE_METHOD)(b"", timeout=10)).decode()
