"""The load-test harness: drives any llmrpc endpoint at set loads and reports latency against load.

Loads (one run per level, each level a fresh set of requests):

- closed loop: `--concurrency 1,4,16`: that many clients, each sending its next
  request as soon as the last one ends;
- open loop: `--rate 2,8` (requests/s, Poisson arrivals), or `--trace FILE`:
  replay of a trace's arrival times and lengths, optionally sped up (`--time-scale 0.5`
  halves every gap). Levels of a trace are time scales: `--time-scale 1,0.5,0.25`.

Trace files are JSONL, one request a line, with the columns of the Qwen Bailian
traces (qwen_traceA/B): `timestamp` (arrival, seconds from any origin; the first
line's is the start), `input_length` and `output_length` (tokens). Other columns
(chat_id, hash_ids, type, turn, ...) are ignored; `--trace-time-unit ms` reads
millisecond timestamps.

Endpoints (`--api`): `grpc` sends token ids (the scheduler's or the tokenizer's
Generate; `--text` sends random words to the tokenizer instead), `http` posts to
the OpenAI `/v1/completions` route with `stream: true`. Every request has
`ignore_eos`, so its output length is exactly the one asked for.

Reports per level: request and token throughput, TTFT, inter-token latency (ITL)
and end-to-end latency at p50/p90/p99, errors by status code. Writes a JSON
(command, commit, hardware, date) and a PNG of latency against achieved load.

    python -m llmrpc.bench.load --target 127.0.0.1:50051 --concurrency 1,4,16 \\
        --num-requests 64 --input-len 128 --output-len 32 --out bench/results/load-cpu
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmrpc.bench.record import provenance, write_json

WORDS = ("time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child",
         "eye", "woman", "place", "work", "week", "case", "point", "number", "group", "problem", "fact")


@dataclass(frozen=True)
class Job:
    """One request of a run: when it is due (open loop) and its lengths."""

    arrival_s: float
    input_len: int
    output_len: int


@dataclass
class Outcome:
    """What one request measured."""

    status: str = "OK"
    start: float = 0.0
    first_token: float | None = None
    end: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # inter-token latency of every token after the first


# ---- workloads -----------------------------------------------------------------------


def read_trace(path: Path, time_unit: str = "s") -> list[Job]:
    """Jobs from a JSONL trace (timestamp, input_length, output_length), arrivals from 0."""
    scale = {"s": 1.0, "ms": 1e-3}[time_unit]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            rows.append((float(row["timestamp"]) * scale, int(row["input_length"]), int(row["output_length"])))
        except KeyError as exc:
            raise ValueError(f"{path}:{number}: missing column {exc}; need timestamp, input_length, output_length")
    rows.sort()
    origin = rows[0][0] if rows else 0.0
    return [Job(t - origin, max(1, i), max(1, o)) for t, i, o in rows]


def _length(spec: str, rng: random.Random) -> int:
    """`128` or a uniform range `64:256`."""
    lo, _, hi = spec.partition(":")
    return rng.randint(int(lo), int(hi)) if hi else int(lo)


def synthetic_jobs(n: int, rate: float | None, input_len: str, output_len: str, seed: int) -> list[Job]:
    """n jobs; with a rate, Poisson arrivals (exponential gaps), else all due at once (closed loop)."""
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(n):
        if rate:
            t += rng.expovariate(rate)
        jobs.append(Job(t if rate else 0.0, _length(input_len, rng), _length(output_len, rng)))
    return jobs


def fit_to_context(jobs: list[Job], context: int) -> list[Job]:
    """Trims inputs so input + output fits the model's context (long trace rows)."""
    out = []
    for j in jobs:
        output = min(j.output_len, context // 2)
        out.append(Job(j.arrival_s, max(1, min(j.input_len, context - output - 1)), output))
    return out


# ---- clients -------------------------------------------------------------------------


class GrpcClient:
    def __init__(self, target: str, api_key: str | None, tls_ca: str | None, text: bool, vocab: int = 0) -> None:
        import grpc

        from llmrpc.services import rpc
        from llmrpc.v1 import generation_pb2, generation_pb2_grpc

        self.grpc, self.pb = grpc, generation_pb2
        credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None
        self.channel = rpc.channel(target, credentials)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.text = text
        self.vocab = vocab

    async def model_info(self) -> dict:
        info = await self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=30, metadata=self.metadata)
        self.vocab = info.vocab_size
        return {"model": info.model_name, "context_length": info.context_length, "vocab_size": info.vocab_size}

    async def run(self, job: Job, rng: random.Random) -> Outcome:
        pb = self.pb
        request = pb.GenerateRequest(sampling=pb.SamplingParams(
            max_tokens=job.output_len, ignore_eos=True, temperature=0.0))
        if self.text:
            request.text = " ".join(rng.choice(WORDS) for _ in range(job.input_len))
        else:
            # Above the special tokens, below the vocabulary: any id is a valid prompt token.
            request.tokens.ids.extend(rng.randrange(100, self.vocab) for _ in range(job.input_len))
        out = Outcome(start=time.perf_counter())
        last = out.start
        try:
            async for response in self.stub.Generate(request, metadata=self.metadata, timeout=3600):
                now = time.perf_counter()
                n = len(response.token_ids)
                if n:
                    if out.first_token is None:
                        out.first_token = now
                        out.gaps.extend([0.0] * (n - 1))
                    else:
                        out.gaps.extend([(now - last) / n] * n)  # a message with n tokens: n equal gaps
                    last = now
                    out.output_tokens += n
        except self.grpc.aio.AioRpcError as exc:
            out.status = exc.code().name
        out.end = time.perf_counter()
        return out

    async def close(self) -> None:
        await self.channel.close()


class HttpClient:
    """OpenAI /v1/completions with stream=true, read as server-sent events."""

    def __init__(self, base_url: str, api_key: str | None, tls_ca: str | None, text: bool) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.base = base_url.rstrip("/")
        if "://" not in self.base:
            self.base = ("https://" if tls_ca else "http://") + self.base
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ssl_context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context),
                                             timeout=aiohttp.ClientTimeout(total=3600))
        self.text = text
        self.vocab = 0

    async def model_info(self) -> dict:
        async with self.session.get(f"{self.base}/v1/models", headers=self.headers) as answer:
            answer.raise_for_status()
            model = (await answer.json())["data"][0]
        self.vocab = 0 if self.text else int(model.get("vocab_size", 0) or 0)
        return {"model": model["id"], "context_length": model.get("max_model_len", 0), "vocab_size": self.vocab}

    async def run(self, job: Job, rng: random.Random) -> Outcome:
        if self.text or not self.vocab:
            prompt: object = " ".join(rng.choice(WORDS) for _ in range(job.input_len))
        else:
            prompt = [rng.randrange(100, self.vocab) for _ in range(job.input_len)]
        body = {"prompt": prompt, "max_tokens": job.output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        out = Outcome(start=time.perf_counter())
        last = out.start
        try:
            async with self.session.post(f"{self.base}/v1/completions", json=body, headers=self.headers) as answer:
                if answer.status != 200:
                    out.status = f"HTTP_{answer.status}"
                    await answer.read()
                    out.end = time.perf_counter()
                    return out
                async for raw in answer.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("usage") and not chunk.get("choices"):
                        out.output_tokens = chunk["usage"]["completion_tokens"]
                        continue
                    now = time.perf_counter()
                    if out.first_token is None:
                        out.first_token = now
                    else:
                        out.gaps.append(now - last)  # one event per detokenized piece
                    last = now
        except self.aiohttp.ClientError as exc:
            out.status = type(exc).__name__
        out.end = time.perf_counter()
        return out

    async def close(self) -> None:
        await self.session.close()


# ---- one load level --------------------------------------------------------------------


class Progress:
    """A live status line on stderr."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.done = self.errors = self.tokens = 0
        self.start = time.perf_counter()

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.errors += outcome.status != "OK"
        self.tokens += outcome.output_tokens

    def show(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} done, {self.errors} errors, "
                         f"{self.tokens / max(elapsed, 1e-9):.1f} tok/s, {elapsed:.1f} s   " + ("\n" if final else ""))
        sys.stderr.flush()


async def run_level(client, jobs: list[Job], concurrency: int | None, label: str, seed: int) -> tuple[list[Outcome], float]:
    """Runs the jobs closed-loop (`concurrency` clients) or open-loop (at their arrival times)."""
    rng = random.Random(seed)
    progress = Progress(label, len(jobs))
    outcomes: list[Outcome] = []

    async def one(job: Job) -> None:
        outcome = await client.run(job, rng)
        outcomes.append(outcome)
        progress.update(outcome)

    async def ticker() -> None:
        while True:
            progress.show()
            await asyncio.sleep(0.5)

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    if concurrency:
        queue = list(reversed(jobs))

        async def loop() -> None:
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    else:
        tasks = []
        for job in jobs:
            delay = start + job.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(job)))
        await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    tick.cancel()
    progress.show(final=True)
    return outcomes, duration


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values) * 1e3  # milliseconds
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize(outcomes: list[Outcome], jobs: list[Job], duration: float) -> dict:
    ok = [o for o in outcomes if o.status == "OK"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != "OK":
            errors[o.status] = errors.get(o.status, 0) + 1
    output = sum(o.output_tokens for o in ok)
    return {
        "requests": len(outcomes), "completed": len(ok), "errors": errors, "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": output / duration,
        "input_token_throughput": sum(j.input_len for j in jobs) / duration,
        "output_tokens": output, "expected_output_tokens": sum(j.output_len for j in jobs),
        "ttft_ms": _percentiles([o.first_token - o.start for o in ok if o.first_token is not None]),
        "itl_ms": _percentiles([g for o in ok for g in o.gaps]),
        "e2e_ms": _percentiles([o.end - o.start for o in ok]),
    }


# ---- report --------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    """Latency (TTFT, ITL, end to end; p50 and p99) against achieved request throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [lv["request_throughput"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "itl_ms", "e2e_ms"),
                              ("time to first token", "inter-token latency", "end-to-end latency")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [lv[key][q] for lv in levels], style, label=q)
        for xi, lv in zip(x, levels):
            ax.annotate(lv["label"], (xi, lv[key]["p50"] or 0), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title(title)
        ax.set_xlabel("achieved throughput (requests/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['model'].get('model', '')} via {report['api']} {report['target']} — {report['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict:
    if args.api == "http":
        client = HttpClient(args.target, args.api_key, args.tls_ca, args.text)
    else:
        client = GrpcClient(args.target, args.api_key, args.tls_ca, args.text)
    try:
        model = await client.model_info()
        if args.trace:
            mode, values = "trace", [float(v) for v in args.time_scale.split(",")]
        elif args.rate:
            mode, values = "poisson", [float(v) for v in args.rate.split(",")]
        else:
            mode, values = "closed", [int(v) for v in (args.concurrency or "1").split(",")]
        levels = []
        for i, value in enumerate(values):
            if mode == "trace":
                base = read_trace(Path(args.trace), args.trace_time_unit)[: args.num_requests or None]
                jobs = [Job(j.arrival_s * value, j.input_len, j.output_len) for j in base]
                label, concurrency = f"x{value:g} time", None
            elif mode == "poisson":
                jobs = synthetic_jobs(args.num_requests, value, args.input_len, args.output_len, args.seed + i)
                label, concurrency = f"{value:g} req/s", None
            else:
                jobs = synthetic_jobs(args.num_requests, None, args.input_len, args.output_len, args.seed + i)
                label, concurrency = f"c={value}", int(value)
            if model.get("context_length"):
                jobs = fit_to_context(jobs, model["context_length"])
            outcomes, duration = await run_level(client, jobs, concurrency, label, args.seed + i)
            levels.append({"label": label, "load": value, **summarize(outcomes, jobs, duration)})
    finally:
        await client.close()
    return {
        **provenance("llmrpc.bench.load"),
        "target": args.target, "api": args.api, "mode": mode, "model": model,
        "workload": {"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                     "trace": args.trace, "text": args.text, "seed": args.seed},
        "levels": levels,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmrpc.bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port (gRPC) or http[s]://host:port (HTTP)")
    p.add_argument("--api", choices=["grpc", "http"], default="grpc")
    p.add_argument("--text", action="store_true", help="send random words as text instead of token ids")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (TLS)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed loop: comma-separated client counts, one level each")
    load.add_argument("--rate", help="open loop: comma-separated Poisson arrival rates (requests/s)")
    load.add_argument("--trace", help="open loop: replay this JSONL trace (timestamp, input_length, output_length)")
    p.add_argument("--time-scale", default="1", help="trace levels: comma-separated factors on every arrival gap")
    p.add_argument("--trace-time-unit", choices=["s", "ms"], default="s")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level (trace: first N rows, 0: all)")
    p.add_argument("--input-len", default="128", help="tokens (or words with --text): N or LO:HI")
    p.add_argument("--output-len", default="32", help="tokens: N or LO:HI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = asyncio.run(run(args))
    for lv in report["levels"]:
        print(f"{lv['label']:>12}: {lv['completed']}/{lv['requests']} ok {lv['errors'] or ''} "
              f"{lv['request_throughput']:.2f} req/s {lv['output_token_throughput']:.1f} tok/s | "
              f"TTFT p50/p99 {lv['ttft_ms']['p50'] or 0:.0f}/{lv['ttft_ms']['p99'] or 0:.0f} ms | "
              f"ITL p50/p99 {lv['itl_ms']['p50'] or 0:.1f}/{lv['itl_ms']['p99'] or 0:.1f} ms | "
              f"E2E p50/p99 {lv['e2e_ms']['p50'] or 0:.0f}/{lv['e2e_ms']['p99'] or 0:.0f} ms")
    if args.out:
        out = Path(args.out)
        write_json(out.with_suffix(".json"), report)
        plot(report, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
