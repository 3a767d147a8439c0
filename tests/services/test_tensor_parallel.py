"""Tensor parallelism through the services: `llmrpc serve --tp 3` and `llmrpc worker --rank R --tp N`.

On the CPU the ranks talk over gloo. The default model (SmolLM2-135M-Instruct:
9 attention heads, 3 KV heads) served by three ranks must answer token for token
what one rank answers; a rank killed mid-stream must end the streams in flight
with UNAVAILABLE and turn the scheduler NOT_SERVING at once, and the launcher then
restarts the whole worker group. The same failure with single-service processes
(how containers run) also ends the surviving rank, whose group is broken.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from llmrpc.services.client import build_request
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from llmrpc.services.local_stack import LocalStack
from llmrpc.services.rpc import free_port
from tests.conftest import start_stack
from tests.services.conftest import health_status, service, wait_status
from tests.services.test_launcher import process_group, wait_for

PROMPTS = ["What is the capital of France?", "Name three colors.", "Count from one to five."]
MAX_TOKENS = 16


async def greedy_tokens(target: str, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The prompts at once (one batch), greedy, exactly `max_tokens` tokens each."""
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)

        async def one(prompt: str) -> list[int]:
            request = build_request(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return [t async for r in stub.Generate(request, timeout=120) for t in r.token_ids]

        return list(await asyncio.gather(*map(one, prompts)))


async def kill_mid_stream(target: str, request: pb.GenerateRequest, pid: int) -> grpc.aio.AioRpcError:
    """Starts a long stream, SIGKILLs `pid` after its first token, returns the error that ends the stream."""
    async with channel(target) as ch:
        call = generation_pb2_grpc.GenerationStub(ch).Generate(request, timeout=60)
        await call.read()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
                pass
        return error.value


def worker_rank_pids(stack: LocalStack) -> dict[int, int]:
    """rank -> pid of the stack's worker processes."""
    ranks = {}
    for pid, cmdline in process_group(stack.process.pid).items():
        words = cmdline.split()
        if "worker" in words and "--rank" in words:
            ranks[int(words[words.index("--rank") + 1])] = pid
    return ranks


@pytest.fixture(scope="module")
def tp3_stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    stack = start_stack(tmp_path_factory.mktemp("tp3"), default_model_dir, "--max-total-tokens", "2048", tp=3)
    yield stack
    stack.stop()


def test_tp3_answers_token_for_token_as_tp1(tp3_stack: LocalStack, default_stack: LocalStack) -> None:
    one = asyncio.run(greedy_tokens(default_stack.tokenizer, PROMPTS))
    three = asyncio.run(greedy_tokens(tp3_stack.tokenizer, PROMPTS))
    assert [len(t) for t in one] == [MAX_TOKENS] * len(PROMPTS)
    assert three == one

    async def info() -> pb.ModelInfo:
        async with channel(tp3_stack.scheduler) as ch:
            return await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)

    assert asyncio.run(info()).tp_size == 3


def test_killed_rank_fails_streams_and_the_group_restarts(tp3_stack: LocalStack) -> None:
    before = asyncio.run(greedy_tokens(tp3_stack.tokenizer, PROMPTS[:1], 8))
    ranks = worker_rank_pids(tp3_stack)
    assert sorted(ranks) == [0, 1, 2]
    request = build_request(PROMPTS[0], max_tokens=1000, temperature=0.0, ignore_eos=True)
    killed_at = time.monotonic()
    error = asyncio.run(kill_mid_stream(tp3_stack.tokenizer, request, ranks[1]))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed_at < 5
    assert health_status(tp3_stack.scheduler) == "NOT_SERVING"
    # The launcher replaces the whole group (the survivors were bound to the dead rank) ...
    # (the survivors' collectives fail, so one of them may be the first death the launcher sees)
    wait_for(lambda: "restarting the workers group" in tp3_stack.log(), 10, "the launcher to restart the group")
    assert "worker rank 1 killed by SIGKILL" in tp3_stack.log()
    wait_for(lambda: len(set(worker_rank_pids(tp3_stack).values()) & set(ranks.values())) == 0, 15,
             "every old rank to be gone")
    # ... and the stack then serves the same answers again.
    after = None
    while after is None:
        try:
            after = asyncio.run(greedy_tokens(tp3_stack.tokenizer, PROMPTS[:1], 8))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() - killed_at < 90, "the stack did not serve again within 90 s"
            time.sleep(0.5)
    assert after == before
    assert sorted(worker_rank_pids(tp3_stack)) == [0, 1, 2]


def test_worker_ranks_as_single_services(tmp_path: Path, tiny_model: Path) -> None:
    """`llmrpc worker --rank R --tp 2 --dist-init-addr H:P`, as containers run it, behind one scheduler."""
    rendezvous = f"127.0.0.1:{free_port()}"
    workers = [service(tmp_path, "worker", "--model", tiny_model, "--device", "cpu", "--rank", rank, "--tp", 2,
                       "--dist-init-addr", rendezvous, "--max-total-tokens", 4096) for rank in (0, 1)]
    scheduler = service(tmp_path, "scheduler", "--workers", ",".join(w.target for w in workers),
                        "--check-kv-invariants")
    services = [*workers, scheduler]
    try:
        for svc in services:
            svc.start()
        for svc in services:
            wait_status(svc, "SERVING")
        request = pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6, 7, 8]),
                                     sampling=pb.SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
        killed_at = time.monotonic()
        error = asyncio.run(kill_mid_stream(scheduler.target, request, workers[1].process.pid))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - killed_at < 5
        assert health_status(scheduler.target) == "NOT_SERVING"
        # The surviving rank's collective failed: it exits, so its own supervisor restarts it too.
        assert workers[0].process.wait(10) == 1
        assert "rank 0 exits: its tensor-parallel group is broken" in workers[0].log()
    finally:
        for svc in reversed(services):
            svc.stop()
