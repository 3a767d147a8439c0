"""`llmrpc worker --kv-cache-dtype fp8_e4m3`: the worker process stores its KV in float8, reports it in
WorkerInfo, and serves the scheduler's step stream with the in-process engine's tokens.

(That `serve --kv-cache-dtype` reaches its worker is tests/services/test_launcher.py's every-flag test.)
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmrpc.services.llm import LLM
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.services.conftest import service, wait_status

MAX_TOTAL_TOKENS = 2048
PROMPTS = [[(13 * i + 7 * j) % 49000 + 5 for i in range(n)] for j, n in enumerate((3, 17, 40))]
GREEDY = pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def _info_and_tokens(worker: str, scheduler: str) -> tuple[worker_pb2.WorkerInfo, pb.ModelInfo, list[list[int]]]:
    async with channel(worker) as ch:
        info = await worker_pb2_grpc.WorkerStub(ch).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
    async with channel(scheduler) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        model = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

        async def one(prompt: list[int]) -> list[int]:
            request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt), sampling=GREEDY)
            return [t async for r in stub.Generate(request, timeout=120) for t in r.token_ids]

        tokens = await asyncio.gather(*(one(p) for p in PROMPTS))
    return info, model, list(tokens)


def test_an_fp8_worker_reports_its_kv_dtype_and_serves_the_engines_tokens(tmp_path: Path, tiny_model: Path) -> None:
    worker = service(tmp_path, "worker", "--model", tiny_model, "--device", "cpu", "--kv-cache-dtype", "fp8_e4m3",
                     "--max-total-tokens", MAX_TOTAL_TOKENS)
    scheduler = service(tmp_path, "scheduler", "--workers", worker.target, "--check-kv-invariants")
    try:
        for svc in (worker, scheduler):
            svc.start()
            wait_status(svc, "SERVING")
        info, model, tokens = asyncio.run(_info_and_tokens(worker.target, scheduler.target))
    finally:
        scheduler.stop()
        worker.stop()
    assert (info.kv_cache_dtype, info.dtype, info.num_pages * info.page_size) == ("float8_e4m3fn", "float32",
                                                                                  MAX_TOTAL_TOKENS)
    assert model.total_kv_tokens == MAX_TOTAL_TOKENS
    llm = LLM(str(tiny_model), max_total_tokens=MAX_TOTAL_TOKENS, kv_cache_dtype="fp8_e4m3", check_invariants=True)
    assert tokens == [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert all(len(t) == GREEDY.max_tokens for t in tokens)


def test_an_unknown_kv_cache_dtype_is_refused_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmrpc.services import cli

    with pytest.raises(SystemExit):  # argparse: not one of the flag's choices
        cli.build_parser().parse_args(["worker", "--kv-cache-dtype", "fp8"])
    # A container's environment is a default, which argparse does not check: the config does.
    monkeypatch.setenv("LLMRPC_KV_CACHE_DTYPE", "fp8")
    args = cli.build_parser().parse_args(["worker", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"kv_cache_dtype \(--kv-cache-dtype\) must be one of auto, fp8_e4m3"):
        cli.engine_config(args, "/models/m")
