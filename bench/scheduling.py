"""Scheduling measured against a real `llmrpc serve` stack on a tiny random-weight Llama (CPU).

The two figures of issue 3 that need the real worker:

1. Chunked prefill keeps streams flowing: 16 streams decode, then a 32k-token prompt
   arrives (`--max-prefill-tokens 8192`, so 4 chunks of 8k). The worst inter-token gap of
   the 16 streams while it prefills is compared with one chunk's compute, measured alone:
   the first chunk (an 8k prompt) and the last, costliest one (8k new tokens after a cached
   24k prefix: it attends to the whole prompt), medians of 3, and with the whole prompt's prefill alone.
2. Prefix cache: time to first token of 8 questions after one 2,000-token shared system
   prompt, sent one after another: the first prefills the system prompt, the rest reuse it.

The model (bench/tiny_model.py, with a 40k context) is built here with transformers and the
default model's tokenizer files; the stack is started and stopped by this script.

  python -m llmrpc.bench.scheduling [--quick] [--out bench/results/scheduling-cpu-tiny.json]
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from llmrpc.bench.record import provenance, write_json
from llmrpc.bench.tiny_model import DESCRIPTION, VOCAB, build_tiny_llama
from llmrpc.services.local_stack import LocalStack
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc

CONTEXT = 40960
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scheduling-cpu-tiny.json"
PROBES = 3  # each chunk-alone figure is the median of this many: a shared 2-core machine is noisy


def _request(rid: str, prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, tokens=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _ttft(stub, request: pb.GenerateRequest) -> tuple[float, pb.Usage]:
    """Seconds from sending to the first token, and the final usage."""
    t0 = time.perf_counter()
    first = None
    usage = None
    async for r in stub.Generate(request, timeout=600):
        if first is None and r.token_ids:
            first = time.perf_counter() - t0
        if r.HasField("usage"):
            usage = r.usage
    return first, usage


async def measure_long_prompt_gap(target: str, prompt_len: int, chunk: int, streams: int,
                                  rng: np.random.Generator) -> dict:
    """Worst inter-token gap of `streams` decoding streams while a `prompt_len` prompt prefills."""
    long_prompt = rng.integers(3, VOCAB, prompt_len).tolist()
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        # Alone first: the first chunk's compute (an 8k prompt) and the whole prefill.
        await _ttft(stub, _request("warm", rng.integers(3, VOCAB, 64).tolist(), 2))
        first_chunks = [(await _ttft(stub, _request(f"chunk-alone{i}", rng.integers(3, VOCAB, chunk).tolist(), 1)))[0]
                        for i in range(PROBES)]
        whole = rng.integers(3, VOCAB, prompt_len).tolist()
        whole_alone, _ = await _ttft(stub, _request("whole-alone", whole, 1))
        # The last chunk attends to the whole prompt, so it costs the most: measure it alone as
        # the cached first (prompt_len - chunk) tokens of `whole` plus `chunk` new ones.
        last_chunks = []
        for i in range(PROBES):
            last = whole[:prompt_len - chunk] + rng.integers(3, VOCAB, chunk).tolist()
            seconds, usage = await _ttft(stub, _request(f"last-chunk-alone{i}", last, 1))
            if usage.cached_prompt_tokens != prompt_len - chunk:
                raise RuntimeError(f"the last-chunk probe found {usage.cached_prompt_tokens} cached tokens, "
                                   f"not {prompt_len - chunk}")
            last_chunks.append(seconds)
        chunk_alone, last_chunk_alone = statistics.median(first_chunks), statistics.median(last_chunks)

        arrivals: list[list[float]] = [[] for _ in range(streams)]
        calls = [stub.Generate(_request(f"s{i}", rng.integers(3, VOCAB, 32).tolist(), 4000))
                 for i in range(streams)]

        async def read(i: int) -> None:
            try:
                async for r in calls[i]:
                    if r.token_ids:
                        arrivals[i].append(time.perf_counter())
            except grpc.aio.AioRpcError as exc:  # the cancel at the end ends each stream
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise
            except asyncio.CancelledError:
                pass

        readers = [asyncio.create_task(read(i)) for i in range(streams)]
        while min(len(a) for a in arrivals) < 20:  # all 16 decoding, past their prefill
            for task in readers:
                if task.done():
                    task.result()  # a stream that failed raises here rather than hanging the wait
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        t_submit = time.perf_counter()
        under_load, _ = await _ttft(stub, _request("long", long_prompt, 1))
        t_done = t_submit + under_load
        await asyncio.sleep(0.5)
        for c in calls:
            c.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    if min(a[-1] for a in arrivals) < t_done:
        raise RuntimeError("a stream ended before the long prompt's first token: its gaps would be missed")

    def gaps(a: list[float], lo: float, hi: float) -> list[float]:
        return [b - x for x, b in zip(a, a[1:]) if b > lo and x < hi]

    during = [g for a in arrivals for g in gaps(a, t_submit, t_done)]
    before = [g for a in arrivals for g in gaps(a, t_submit - 0.5, t_submit)]
    return {
        "measurement": "long_prompt_vs_streams",
        "prompt_tokens": prompt_len, "max_prefill_tokens": chunk, "streams": streams,
        "first_chunk_alone_s": chunk_alone,
        "last_chunk_alone_s": last_chunk_alone,
        "first_chunk_alone_all_s": first_chunks,
        "last_chunk_alone_all_s": last_chunks,
        "whole_prompt_alone_s": whole_alone,
        "long_prompt_ttft_under_load_s": under_load,
        "median_gap_before_s": statistics.median(before),
        "worst_gap_during_s": max(during),
        "median_gap_during_s": statistics.median(during),
        "worst_gap_over_last_chunk": max(during) / last_chunk_alone,
        "worst_gap_over_whole": max(during) / whole_alone,
    }


async def measure_shared_prefix(target: str, system_len: int, questions: int, rng: np.random.Generator) -> dict:
    """TTFT of `questions` requests that share a `system_len`-token system prompt, one after another."""
    system = rng.integers(3, VOCAB, system_len).tolist()
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        await _ttft(stub, _request("warm", rng.integers(3, VOCAB, 64).tolist(), 2))
        results = [await _ttft(stub, _request(f"q{i}", system + rng.integers(3, VOCAB, 24).tolist(), 8))
                   for i in range(questions)]
    ttfts = [t for t, _ in results]
    return {
        "measurement": "shared_prefix_ttft",
        "system_tokens": system_len, "questions": questions,
        "ttft_s": ttfts,
        "cached_prompt_tokens": [u.cached_prompt_tokens for _, u in results],
        "first_ttft_s": ttfts[0],
        "rest_median_ttft_s": statistics.median(ttfts[1:]),
        "first_over_rest": ttfts[0] / statistics.median(ttfts[1:]),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="an 8k prompt in 2k chunks instead of 32k in 8k (a smoke run)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    prompt_len, chunk = (8192, 2048) if args.quick else (32768, 8192)
    streams, system_len, questions = 16, 2000, 8

    from llmrpc.engine.default_model import ensure_default_model
    from llmrpc.services.cli import default_cache_dir

    # SIGTERM unwinds like Ctrl-C, so the serve process group below is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="llmrpc-bench-") as tmp:
        model = build_tiny_llama(Path(tmp) / "tiny-llama", ensure_default_model(default_cache_dir()), CONTEXT)
        pool = 2 * prompt_len + 16 * 4096
        with LocalStack.start(Path(tmp), model, "--max-prefill-tokens", str(chunk),
                              "--max-total-tokens", str(pool)) as stack:
            gap = asyncio.run(measure_long_prompt_gap(stack.scheduler, prompt_len, chunk, streams, rng))
            prefix = asyncio.run(measure_shared_prefix(stack.scheduler, system_len, questions, rng))

    print(f"long prompt: {prompt_len} tokens in chunks of {chunk}, {streams} streams decoding")
    print(f"  {'median gap before':>24} {gap['median_gap_before_s'] * 1e3:9.1f} ms")
    print(f"  {'worst gap during prefill':>24} {gap['worst_gap_during_s'] * 1e3:9.1f} ms")
    print(f"  {'first chunk alone':>24} {gap['first_chunk_alone_s'] * 1e3:9.1f} ms")
    print(f"  {'last chunk alone':>24} {gap['last_chunk_alone_s'] * 1e3:9.1f} ms")
    print(f"  {'whole prompt alone':>24} {gap['whole_prompt_alone_s'] * 1e3:9.1f} ms")
    print(f"  {'whole prompt under load':>24} {gap['long_prompt_ttft_under_load_s'] * 1e3:9.1f} ms")
    print(f"shared {system_len}-token system prompt, {questions} questions one after another")
    print(f"  {'TTFT first':>24} {prefix['first_ttft_s'] * 1e3:9.1f} ms")
    print(f"  {'TTFT rest (median)':>24} {prefix['rest_median_ttft_s'] * 1e3:9.1f} ms")
    print(f"  {'cached prompt tokens':>24} {prefix['cached_prompt_tokens']}")
    result = {
        "benchmark": "scheduling",
        **provenance("llmrpc.bench.scheduling", argv),
        "config": {"model": DESCRIPTION,
                   "device": "cpu", "dtype": "auto", "page_size": 16, "kv_pool_tokens": pool,
                   "overlap": True},
        "results": [gap, prefix],
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
