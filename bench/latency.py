"""Latency at idle through the full stack: single-stream decode speed and time to first token.

  decode  one request at a time: a 128-token prompt, 512 tokens out (ignore_eos);
          decode tokens/s = 511 / (time of the last token - time of the first)
  ttft    one request at a time: a 2,048-token prompt, 1 token out; the time from
          sending Generate to its first streamed message (median of several)
Both call the scheduler's token-level Generate over gRPC, with `llmrpc worker` and
`llmrpc scheduler` running as processes (bench/offline.py's Stack).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmrpc.bench.offline import Stack, _row


async def _stream(stub, pb, prompt: list[int], max_tokens: int, rid: str) -> list[float]:
    """Arrival times (perf_counter, relative to the send) of each streamed token."""
    req = pb.GenerateRequest(request_id=rid, tokens=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                             stream=True)
    t0 = time.perf_counter()
    times: list[float] = []
    async for resp in stub.Generate(req):
        now = time.perf_counter() - t0
        times += [now] * len(resp.token_ids)
    return times


async def measure(target: str, repeats: int) -> dict:
    import grpc

    from llmrpc.v1 import generation_pb2 as pb
    from llmrpc.v1 import generation_pb2_grpc

    rng = random.Random(0)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        for i in range(3):  # warm-up: JIT, graphs, allocator
            await _stream(stub, pb, [rng.randint(0, 10000) for _ in range(2048)], 64, f"w{i}")
        decode, ttft = [], []
        for i in range(repeats):
            times = await _stream(stub, pb, [rng.randint(0, 10000) for _ in range(128)], 512, f"d{i}")
            assert len(times) == 512, len(times)
            decode.append(511 / (times[-1] - times[0]))
        for i in range(repeats * 2):
            # A fresh random prompt each time: no prefix-cache hit.
            times = await _stream(stub, pb, [rng.randint(0, 10000) for _ in range(2048)], 1, f"t{i}")
            ttft.append(times[0])
    return {"decode_tok_s": statistics.median(decode), "decode_all": decode,
            "ttft_ms": 1e3 * statistics.median(ttft), "ttft_all_ms": [1e3 * t for t in ttft]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--disable-overlap", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    stack = Stack(args, port=50252)
    try:
        stack.wait_ready()
        m = asyncio.run(measure(stack.target, args.repeats))
    finally:
        stack.close()
    base = _row(args, "llmrpc-stack", m["decode_tok_s"], decode_tok_s_all=m["decode_all"])
    base.update(benchmark="latency", metric="single_stream_decode", command=" ".join(
        ["python -m llmrpc.bench.latency", *sys.argv[1:]]))
    ttft = _row(args, "llmrpc-stack", 0.0, ttft_ms=round(m["ttft_ms"], 2), ttft_all_ms=m["ttft_all_ms"])
    ttft.update(benchmark="latency", metric="ttft_2048", output_tokens_per_s=None, command=base["command"])
    rows = [base, ttft]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"single-stream decode: {m['decode_tok_s']:.0f} tok/s; TTFT(2048): {m['ttft_ms']:.1f} ms")


if __name__ == "__main__":
    main()
