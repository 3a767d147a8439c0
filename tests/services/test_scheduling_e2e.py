"""Scheduling end to end with the real worker on a tiny model, through `llmrpc serve` processes.

Token input goes straight to the scheduler port. Two properties of issue 3:
- a load 4x larger than the KV pool gives every request the same greedy tokens it gets
  alone, while the scheduler retracts and recomputes requests to make room (with three
  steps in flight);
- a long shared system prompt is prefilled once: later questions report it as cached.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from llmrpc.bench.tiny_model import VOCAB, build_tiny_llama
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.conftest import start_stack


@pytest.fixture(scope="module")
def tiny_model_4k(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """llmrpc.bench.tiny_model's random Llama with a 4,096-token context: the shared-prefix test needs over 2,048."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4k"), default_model_dir, 4096)


def _request(rid: str, prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, tokens=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _generate(stub: generation_pb2_grpc.GenerationStub, request: pb.GenerateRequest) -> tuple[list[int], pb.Usage]:
    tokens: list[int] = []
    usage = None
    async for r in stub.Generate(request, timeout=120):
        tokens += r.token_ids
        if r.HasField("usage"):
            usage = r.usage
    return tokens, usage


def _scheduler_counter(http: str, name: str) -> float:
    text = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    match = re.search(rf"^llmrpc_scheduler_{name}_total (\S+)$", text, re.MULTILINE)
    assert match, f"llmrpc_scheduler_{name}_total missing from /metrics"
    return float(match.group(1))


# 48 requests of 16..96 prompt tokens and 40..96 new ones need ~5,900 KV tokens at once;
# the pool holds 1,280 (80 pages of 16), so they cannot all run together. Outputs are long
# next to prompts: admission reserves only each running request's next page, so a full pool
# of admitted prompts must outgrow it while decoding, however the arrivals interleave with steps.
NUM_REQUESTS = 48
POOL_TOKENS = 1280


def test_oversubscribed_load_matches_each_request_alone(tmp_path: Path, tiny_model_4k: Path) -> None:
    rng = np.random.default_rng(3)
    requests = [_request(f"r{i}", rng.integers(3, VOCAB, int(rng.integers(16, 97))).tolist(),
                         int(rng.integers(40, 97))) for i in range(NUM_REQUESTS)]
    demand = sum(len(r.tokens.ids) + r.sampling.max_tokens for r in requests)
    assert demand >= 3.5 * POOL_TOKENS
    # Three steps in flight: retraction and finishes must hold with a deep pipeline too.
    stack = start_stack(tmp_path, tiny_model_4k, "--max-total-tokens", str(POOL_TOKENS), "--overlap-depth", "3")

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with channel(stack.scheduler) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            together = await asyncio.gather(*(_generate(stub, r) for r in requests))
            alone = [await _generate(stub, r) for r in requests]
        return [t for t, _ in together], [t for t, _ in alone]

    try:
        together, alone = asyncio.run(run())
        retractions = _scheduler_counter(stack.http, "retractions")
    finally:
        stack.stop()
    assert [len(t) for t in together] == [r.sampling.max_tokens for r in requests]
    assert together == alone
    assert retractions > 0


SYSTEM_TOKENS = 2000
QUESTIONS = 8


def test_shared_system_prompt_is_served_from_the_prefix_cache(tmp_path: Path, tiny_model_4k: Path) -> None:
    rng = np.random.default_rng(4)
    system = rng.integers(3, VOCAB, SYSTEM_TOKENS).tolist()
    questions = [rng.integers(3, VOCAB, int(rng.integers(10, 40))).tolist() for _ in range(QUESTIONS)]
    stack = start_stack(tmp_path, tiny_model_4k, "--max-total-tokens", "8192")

    async def run() -> list[pb.Usage]:
        async with channel(stack.scheduler) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            return [(await _generate(stub, _request(f"q{i}", system + q, 4)))[1] for i, q in enumerate(questions)]

    try:
        usages = asyncio.run(run())
    finally:
        stack.stop()
    assert [u.prompt_tokens for u in usages] == [SYSTEM_TOKENS + len(q) for q in questions]
    assert usages[0].cached_prompt_tokens == 0
    assert all(u.cached_prompt_tokens >= 1900 for u in usages[1:]), [u.cached_prompt_tokens for u in usages]
    assert all(u.completion_tokens == 4 for u in usages)
