"""Latency at idle: single-stream decode speed and time to first token, through the stack and the engine.

  decode  one request at a time: a 128-token prompt, 512 tokens out (ignore_eos);
          decode tokens/s = 511 / (time of the last token - time of the first)
  ttft    one request at a time: a 2,048-token prompt, 1 token out; the time from
          sending Generate to its first streamed message (median of several)

stack   the scheduler's token-level Generate over gRPC, with `llmrpc worker` and `llmrpc
        scheduler` running as processes (bench/offline.py's Stack), once per value of
        --overlap-depths and --decode-steps-list (the scheduler is restarted against the same worker)
engine  the same two measurements with services/llm.py's LLM: the scheduler core and ModelRunner
        in this process on the stack's step loop (no gRPC, no processes): what the stack adds is
        the difference
text    the tokenizer's text-level Generate in front of the same stack (--tokenizer: its tokenizer files):
        TTFT of a text that encodes to about 2,048 tokens (the count the tokenizer reports is recorded),
        encode and the tokenizer's hop included
worker  the stack's worker alone (its scheduler stopped), driven over its own Steps stream by
        hand-built steps: the prefill of a 2,048-token prompt timed to its StepResult, and decode
        steps of one row one at a time and with two in flight; with stack and engine it splits
        what the stack adds into the worker's hop and the scheduler's
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from llmrpc.bench.offline import Stack, _row, add_engine_args, engine_llm, scheduler_variants

DECODE_PROMPT, DECODE_TOKENS, TTFT_PROMPT = 128, 512, 2048


def _prompts(rng: random.Random, repeats: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Warm-up, decode and TTFT prompts: fresh random ones each time, so no prefix-cache hit."""
    def draw(n: int, length: int) -> list[list[int]]:
        return [[rng.randint(0, 10000) for _ in range(length)] for _ in range(n)]

    return draw(3, TTFT_PROMPT), draw(repeats, DECODE_PROMPT), draw(2 * repeats, TTFT_PROMPT)


def _summary(decode: list[float], ttft: list[float]) -> dict:
    return {"decode_tok_s": statistics.median(decode), "decode_all": decode,
            "ttft_ms": 1e3 * statistics.median(ttft), "ttft_all_ms": [1e3 * t for t in ttft]}


def request(pb, rid: str, max_tokens: int, **prompt):
    """A streamed, greedy, ignore_eos GenerateRequest; `prompt`: tokens=pb.TokenIds(...) or text=..."""
    return pb.GenerateRequest(request_id=rid, stream=True, **prompt,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def responses(stub, req) -> list[tuple[float, Any]]:
    """Each streamed message of `req` with its arrival time (perf_counter, relative to the send)."""
    t0 = time.perf_counter()
    return [(time.perf_counter() - t0, resp) async for resp in stub.Generate(req)]


async def _stream(stub, pb, prompt: list[int], max_tokens: int, rid: str) -> list[float]:
    """Arrival times (perf_counter, relative to the send) of each streamed token."""
    got = await responses(stub, request(pb, rid, max_tokens, tokens=pb.TokenIds(ids=prompt)))
    return [t for t, resp in got for _ in resp.token_ids]


async def measure_stack(target: str, repeats: int, tag: str) -> dict:
    import grpc

    from llmrpc.v1 import generation_pb2 as pb
    from llmrpc.v1 import generation_pb2_grpc

    warm, decode_prompts, ttft_prompts = _prompts(random.Random(0), repeats)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        for i, p in enumerate(warm):  # JIT, graphs, allocator
            await _stream(stub, pb, p, 64, f"{tag}w{i}")
        decode, ttft = [], []
        for i, p in enumerate(decode_prompts):
            times = await _stream(stub, pb, p, DECODE_TOKENS, f"{tag}d{i}")
            assert len(times) == DECODE_TOKENS, len(times)
            decode.append((DECODE_TOKENS - 1) / (times[-1] - times[0]))
        for i, p in enumerate(ttft_prompts):
            ttft.append((await _stream(stub, pb, p, 1, f"{tag}t{i}"))[0])
    return _summary(decode, ttft)


def _texts(tokenizer_path: str, n: int, rng: random.Random) -> list[str]:
    """`n` fresh texts of about TTFT_PROMPT tokens: random ids decoded, re-encoded, cut to size, decoded."""
    from llmrpc.engine.hub import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    texts = []
    for _ in range(n):
        text = tok.decode([rng.randint(100, 10000) for _ in range(TTFT_PROMPT + 64)])
        texts.append(tok.decode(tok.encode(text, add_special_tokens=False)[:TTFT_PROMPT]))
    return texts


async def measure_text(target: str, tokenizer_path: str, repeats: int) -> dict:
    """TTFT through the tokenizer: a text in, the first streamed message out (median of 2 x repeats)."""
    import grpc

    from llmrpc.v1 import generation_pb2 as pb
    from llmrpc.v1 import generation_pb2_grpc

    warm, timed = 3, 2 * repeats
    texts = _texts(tokenizer_path, warm + timed, random.Random(2))
    ttft, prompt_tokens = [], []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        for i, text in enumerate(texts):
            got = await responses(stub, request(pb, f"x{i}", 1, text=text))
            if i >= warm:
                ttft.append(got[0][0])
                prompt_tokens += [r.usage.prompt_tokens for _, r in got if r.HasField("usage")]
    return {"ttft_ms": 1e3 * statistics.median(ttft), "ttft_all_ms": [1e3 * t for t in ttft],
            "prompt_tokens": sorted(set(prompt_tokens))}


async def measure_worker(target: str, num_pages: int, repeats: int) -> dict:
    """The worker's own Steps stream: prefill(2048) → first token, and one row's decode at depths 0 and 2."""
    import grpc
    import numpy as np

    from llmrpc.engine.step import Sampling, SlotParams, Step
    from llmrpc.services.protocol import encode_step
    from llmrpc.v1 import worker_pb2_grpc

    page_size, ids = 16, iter(range(1 << 62))

    def prefill(prompt: list[int]) -> Step:
        pages = -(-len(prompt) // page_size)
        return Step(next(ids), slots=np.array([0], np.int32), starts=np.array([0], np.int32),
                    chunk_lens=np.array([len(prompt)], np.int32), chunk_tokens=np.array(prompt, np.int32),
                    sample_chunks=np.array([True]), page_counts=np.array([pages], np.int32),
                    page_ids=np.arange(pages, dtype=np.int32) % num_pages,
                    admissions=[SlotParams.of(Sampling(temperature=0.0), 0)])

    def decode(position: int) -> Step:
        new_page = position % page_size == 0
        return Step(next(ids), num_decode=1, slots=np.array([0], np.int32), starts=np.array([position], np.int32),
                    page_counts=np.array([int(new_page)], np.int32),
                    page_ids=np.array([position // page_size % num_pages] if new_page else [], np.int32))

    warm, decode_prompts, ttft_prompts = _prompts(random.Random(1), repeats)
    async with grpc.aio.insecure_channel(target) as ch:
        stream = worker_pb2_grpc.WorkerStub(ch).Steps()  # written to as the scheduler does (call.write)

        async def run(steps: list[Step], depth: int) -> list[float]:
            """Sends `steps` with at most depth + 1 in flight; each one's result time after the first send."""
            t0, sent = time.perf_counter(), 0
            done: list[float] = []
            while len(done) < len(steps):
                while sent < len(steps) and sent - len(done) <= depth:
                    await stream.write(encode_step(steps[sent]))
                    sent += 1
                await stream.read()
                done.append(time.perf_counter() - t0)
            return done

        for p in warm:
            await run([prefill(p)] + [decode(len(p) + i) for i in range(64)], 2)
        ttft = [(await run([prefill(p)], 0))[0] for p in ttft_prompts]
        rates = {}
        for depth in (0, 2):
            tok_s = []
            for p in decode_prompts:
                times = await run([prefill(p)] + [decode(len(p) + i) for i in range(DECODE_TOKENS - 1)], depth)
                tok_s.append((DECODE_TOKENS - 1) / (times[-1] - times[0]))
            rates[depth] = tok_s
        await stream.done_writing()
    summary = _summary(rates[2], ttft)
    summary["decode_tok_s_depth0"] = statistics.median(rates[0])
    return summary


def measure_engine(args: argparse.Namespace, runner=None, decode_steps: int = 1) -> dict:
    """The same requests through services/llm.py's LLM: the core and ModelRunner in this process (one step
    in flight), each token timed as the step loop hands it out. `runner`: one loaded before, reused."""
    from llmrpc.v1.generation_pb2 import SamplingParams

    llm = engine_llm(args, runner=runner, decode_steps=decode_steps)

    def one(prompt: list[int], max_tokens: int) -> list[float]:
        arrivals: list[float] = []
        t0 = time.perf_counter()
        for out in llm.stream([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)):
            now = time.perf_counter() - t0
            arrivals += [now] * (len(out.outputs[0].token_ids) - len(arrivals))
        return arrivals

    warm, decode_prompts, ttft_prompts = _prompts(random.Random(0), args.repeats)
    for p in warm:
        one(p, 64)
    decode = []
    for p in decode_prompts:
        times = one(p, DECODE_TOKENS)
        decode.append((DECODE_TOKENS - 1) / (times[-1] - times[0]))
    ttft = [one(p, 1)[0] for p in ttft_prompts]
    return _summary(decode, ttft)


def _latency_row(row: dict, metric: str, **fields) -> dict:
    """bench/offline.py's row as this bench's: its metric and this command."""
    row.update(benchmark="latency", metric=metric, command=" ".join(["python -m llmrpc.bench.latency", *sys.argv[1:]]),
               **fields)
    return row


def _ttft_row(args: argparse.Namespace, system: str, m: dict, **extra) -> dict:
    return _latency_row(_row(args, system, 0.0, ttft_ms=round(m["ttft_ms"], 2), ttft_all_ms=m["ttft_all_ms"], **extra),
                        "ttft_2048", output_tokens_per_s=None)


def _rows(args: argparse.Namespace, system: str, m: dict, **extra) -> list[dict]:
    decode = _row(args, system, m["decode_tok_s"], decode_tok_s_all=m["decode_all"], **extra)
    return [_latency_row(decode, "single_stream_decode"), _ttft_row(args, system, m, **extra)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--systems", default="stack,engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default="", help="tokenizer files for the text system (a directory or a .gguf)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    rows: list[dict] = []
    table: list[tuple[str, dict]] = []

    def save() -> None:
        if args.out:  # after every measurement: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(rows, indent=2))

    def record(name: str, system: str, m: dict, depth: int, passes: int = 1) -> None:
        rows.extend(_rows(args, system, m, overlap_depth=depth, decode_steps=passes))
        table.append((name, m))
        save()

    systems = args.systems.split(",")
    if "text" in systems and not args.tokenizer:
        raise SystemExit("--systems text needs --tokenizer")
    if {"stack", "worker", "text"} & set(systems):
        variants = scheduler_variants(args)
        stack = Stack(args, *variants[0], tokenizer=args.tokenizer if "text" in systems else None)
        try:
            for depth, passes in variants if "stack" in systems else ():
                stack.use((depth, passes))
                m = asyncio.run(measure_stack(stack.target, args.repeats, f"o{depth}.{passes}-"))
                print(f"stack, overlap depth {depth}, {passes} decode steps: {m['decode_tok_s']:.0f} tok/s, "
                      f"TTFT {m['ttft_ms']:.1f} ms", flush=True)
                record(f"stack d{depth} k{passes}", "llmrpc-stack", m, depth, passes)
            if "text" in systems:
                stack.use(variants[0])
                m = asyncio.run(measure_text(stack.text_target, args.tokenizer, args.repeats))
                print(f"text through the tokenizer: TTFT {m['ttft_ms']:.1f} ms "
                      f"({'/'.join(map(str, m['prompt_tokens']))} prompt tokens)", flush=True)
                rows.append(_ttft_row(args, "llmrpc-text", m, prompt_tokens=m["prompt_tokens"],
                                      overlap_depth=variants[0][0], decode_steps=variants[0][1]))
                table.append(("text", {"decode_tok_s": float("nan"), **m}))
                save()
            if "worker" in systems:
                num_pages = stack.num_pages
                stack.launcher.child("scheduler").stop()  # the worker takes one step stream at a time
                m = asyncio.run(measure_worker(stack.worker_target, num_pages, args.repeats))
                print(f"worker alone: {m['decode_tok_s']:.0f} tok/s at depth 2, {m['decode_tok_s_depth0']:.0f} at "
                      f"depth 0, TTFT {m['ttft_ms']:.1f} ms", flush=True)
                record("worker alone", "llmrpc-worker", m, 2)
        finally:
            stack.close()
    runner = None
    for passes in args.decode_steps_list if "engine" in systems else ():
        runner = runner or engine_llm(args).runner  # loaded once for every decode_steps value
        record(f"engine k{passes}", "llmrpc-engine", measure_engine(args, runner, passes), 1, passes)
    print(f"\n{'system':<16}{'decode tok/s':>13}{'TTFT(2048) ms':>15}")
    for name, m in table:
        print(f"{name:<16}{m['decode_tok_s']:>13.0f}{m['ttft_ms']:>15.1f}")


if __name__ == "__main__":
    main()
