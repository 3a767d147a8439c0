"""Where a first token's time goes through the stack: every hop, token ids in and text in.

Starts the stack with a tokenizer front (bench/offline.py's Stack, `--trace` on every child:
services/trace.py) and sends one request at a time, a 2,048-token prompt for one token, first as token
ids to the scheduler, then as text to the tokenizer. The services' TRACE lines and this process's own
(send, first message) are put on one clock, and each request's points are printed as the median time
since the point before it.

  python -m llmrpc.bench.trace_ttft --model bench/configs/qwen3-0.6b --tokenizer .tok/smollm2 [--requests 20]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import time
from pathlib import Path

from llmrpc.bench.latency import TTFT_PROMPT, _texts, build_parser, request
from llmrpc.bench.offline import Stack

WARM = 5  # requests before the timed ones: JIT, graphs, allocator
FIRST = "client: first message"


async def _send(target: str, inputs: list, kind: str, points: list[tuple[float, str]]) -> None:
    import grpc

    from llmrpc.v1 import generation_pb2 as pb
    from llmrpc.v1 import generation_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        for i, x in enumerate(inputs):
            req = request(pb, f"{kind}{i}", 1, **({"text": x} if kind == "text" else {"tokens": pb.TokenIds(ids=x)}))
            points.append((time.time(), f"client: {kind} sent"))
            first = True
            async for _ in stub.Generate(req):
                if first:
                    points.append((time.time(), FIRST))
                    first = False
            await asyncio.sleep(0.03)  # idle between requests, as bench/latency.py's TTFT is


def hops(points: list[tuple[float, str]], kind: str) -> tuple[float, list[tuple[str, float]]]:
    """(median TTFT ms, [(point, median ms since the point before)]) over the timed requests of `kind`.

    A request's points run from its send to its first message; points after that (an overlapped step's
    result, the rest of the stream) belong to no first token and are dropped."""
    requests: list[tuple[str, list[tuple[float, str]]]] = []
    for t, name in sorted(points):
        if name.startswith("client: ") and name.endswith(" sent"):
            requests.append((name, [(t, name)]))
        elif requests and requests[-1][1][-1][1] != FIRST:
            requests[-1][1].append((t, name))
    timed = [r for name, r in requests if name == f"client: {kind} sent"][WARM:]
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    order: list[str] = []
    for r in timed:
        seen: collections.Counter = collections.Counter()
        for (t0, _), (t1, name) in zip(r, r[1:]):
            seen[name] += 1
            key = name if seen[name] == 1 else f"{name} ({seen[name]})"
            if key not in gaps:
                order.append(key)
            gaps[key].append(1e3 * (t1 - t0))
    ttft = statistics.median(1e3 * (r[-1][0] - r[0][0]) for r in timed)
    return ttft, [(key, statistics.median(gaps[key])) for key in order]


def main() -> None:
    ap = build_parser()
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    if not args.tokenizer:
        raise SystemExit("--tokenizer is needed (the text path)")
    log_dir = Path(args.log_dir) / "trace_ttft"
    log_dir.mkdir(parents=True, exist_ok=True)
    for f in log_dir.glob("*.log"):
        f.unlink()
    args.log_dir = str(log_dir)
    n = WARM + args.requests
    rng = random.Random(3)
    prompts = [[rng.randint(0, 10000) for _ in range(TTFT_PROMPT)] for _ in range(n)]
    texts = _texts(args.tokenizer, n, random.Random(2))
    points: list[tuple[float, str]] = []
    stack = Stack(args, args.overlap_depths[0], tokenizer=args.tokenizer, trace=True)
    try:
        asyncio.run(_send(stack.target, prompts, "tokens", points))
        asyncio.run(_send(stack.text_target, texts, "text", points))
    finally:
        stack.close()
    for f in log_dir.glob("*.log"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("TRACE "):
                _, t, name = line.split(" ", 2)
                points.append((float(t), name))
    for kind in ("tokens", "text"):
        ttft, rows = hops(points, kind)
        print(f"\n{kind} in: {args.requests} requests, TTFT median {ttft:.2f} ms")
        for name, ms in rows:
            print(f"  {name:<34} +{ms:7.3f} ms")


if __name__ == "__main__":
    main()
