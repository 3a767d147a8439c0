"""The load-test harness: drives any llmrpc (or OpenAI-compatible) endpoint at set loads, as the field measures.

Conventions are those of vLLM's `vllm bench serve`, SGLang's `bench_serving` and AIPerf:

- loads, one run per level, each level fresh requests: closed loop `--concurrency 1,4,16` (that many
  clients, each sending its next request as soon as the last ends); open loop `--rate 2,8,inf`
  (requests/s; Poisson arrivals, or gamma ones with `--burstiness`), optionally capped at
  `--max-concurrency` requests in flight (a request's clock starts when it is sent); or `--trace
  FILE`, a replay whose levels are time scales on its arrival gaps (`--time-scale 1,0.5`);
- a level is `--num-requests` requests or, with `--duration S`, whatever is sent in S seconds;
  `--warmup N` requests go first, unmeasured;
- metrics per request: TTFT, TPOT (time per output token after the first: (E2E - TTFT) / (tokens - 1)),
  ITL (every token's gap to the previous one: an event or message carrying n tokens counts n gaps) and
  E2E latency; per level their mean, median, std and `--metric-percentiles`, throughputs, the peak
  output tokens/s and in-flight requests, the prompt tokens served from the prefix cache, and
  goodput: requests/s that met every SLO of `--goodput ttft:MS tpot:MS e2el:MS`;
- JSON keys as vLLM names them (`median_ttft_ms`, `p99_tpot_ms`, `request_goodput`,
  `output_throughput`, ...); `--export-requests` writes every request as a line of OUT.requests.jsonl;
  the PNG plots each metric against the offered load (concurrency, or requests/s).

Traces are JSONL in the Bailian (qwen_traceA/B) or Mooncake format: `timestamp` (arrival; the first
line's is the start; `--trace-time-unit ms` for Mooncake's), `input_length`, `output_length`, and
`hash_ids`: one id per block of `--trace-block-size` prompt tokens (Bailian's 16 = llmrpc's page size;
Mooncake's traces use 512). Equal ids are equal token blocks, so requests sharing leading ids share
a real prompt prefix and the server's prefix cache is exercised as in the traced service. Each level
draws its blocks afresh, so no level hits what an earlier one cached. Other columns are ignored.

Endpoints (`--api`): `grpc` sends token ids to llmrpc's Generate (scheduler or tokenizer; `--text`
sends words to the tokenizer instead); `http` streams OpenAI `/v1/completions` (words, since the
route takes text everywhere; a trace's blocks become fixed word blocks, about one token a word).
Every request has `ignore_eos`, so its output length is the one asked for. Over HTTP a token's
count per event comes from the event's logprobs or per-event usage when the server sends them;
otherwise the exact total of the final usage is spread over the events.

    python -m llmrpc.bench.load --target 127.0.0.1:50051 --rate 1,2,4 --max-concurrency 16 \\
        --duration 60 --warmup 4 --goodput ttft:500 tpot:50 --out bench/results/load-cpu
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from llmrpc.bench.record import provenance, write_json

WORDS = ("time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child",
         "eye", "woman", "place", "work", "week", "case", "point", "number", "group", "problem", "fact")
METRICS = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
           "e2el": "end-to-end latency"}
MIN_TOKEN_ID = 100  # prompt ids stay above the special tokens


@dataclass(frozen=True)
class Job:
    """One request of a run: when it is due (open loop), its lengths, and its trace's prompt blocks."""

    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass
class Outcome:
    """What one request measured (times from time.perf_counter)."""

    status: str = "OK"
    start: float = 0.0
    first_token: float | None = None
    end: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # the gap before every token after the first (ITL)
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (tokens - 1); 0 for a one-token answer, as vLLM counts it."""
        if self.first_token is None:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @property
    def e2el(self) -> float:
        return self.end - self.start

    def take(self, events: list[tuple[float, int]]) -> None:
        """Records (arrival time, tokens) events: an event of n tokens is n gaps of 1/n of its wait."""
        events = [(t, n) for t, n in events if n > 0]
        if not events:
            return
        self.first_token, first = events[0]
        self.gaps = [0.0] * (first - 1)  # tokens that came with the first one
        for (before, _), (now, n) in zip(events, events[1:]):
            self.gaps.extend([(now - before) / n] * n)
        self.output_tokens = sum(n for _, n in events)


# ---- workloads ---------------------------------------------------------------------------


def read_trace(path: Path, time_unit: str = "s") -> list[Job]:
    """Jobs from a JSONL trace (timestamp, input_length, output_length, optional hash_ids), arrivals from 0."""
    scale = {"s": 1.0, "ms": 1e-3}[time_unit]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            rows.append((float(row["timestamp"]) * scale, int(row["input_length"]), int(row["output_length"]),
                         tuple(int(h) for h in row.get("hash_ids") or ())))
        except KeyError as exc:
            raise ValueError(f"{path}:{number}: missing column {exc}; need timestamp, input_length, output_length")
    rows.sort(key=lambda r: r[0])
    origin = rows[0][0] if rows else 0.0
    return [Job(t - origin, max(1, i), max(1, o), h) for t, i, o, h in rows]


def _length(spec: str, rng: random.Random) -> int:
    """`128` or a uniform range `64:256`."""
    lo, _, hi = spec.partition(":")
    return rng.randint(int(lo), int(hi)) if hi else int(lo)


def arrivals(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Arrival times at `rate` requests/s: gamma gaps of shape `burstiness` (1: Poisson); all at 0 when inf."""
    t = 0.0
    while True:
        yield t
        if rate != float("inf"):
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


def synthetic_jobs(rate: float | None, input_len: str, output_len: str, seed: int,
                   burstiness: float = 1.0) -> Iterator[Job]:
    """Endless jobs; with a rate, timed arrivals, else all due at once (closed loop)."""
    rng = random.Random(seed)
    times = arrivals(rate, burstiness, rng) if rate else itertools.repeat(0.0)
    for t in times:
        yield Job(t, _length(input_len, rng), _length(output_len, rng))


def fit_to_context(jobs: list[Job], context: int) -> list[Job]:
    """Trims inputs (their ends: a trace's shared blocks stay) so input + output fits the model's context."""
    out = []
    for j in jobs:
        output = min(j.output_len, context // 2)
        out.append(Job(j.arrival_s, max(1, min(j.input_len, context - output - 1)), output, j.hash_ids))
    return out


class Prompts:
    """Each job's prompt: its trace blocks (the same id, the same block, within one level), then random fill."""

    def __init__(self, vocab: int, text: bool, block_size: int, salt: str) -> None:
        self.vocab, self.text, self.block_size, self.salt = vocab, text or not vocab, block_size, salt
        self._blocks: dict[int, list] = {}

    def _block(self, hash_id: int) -> list:
        block = self._blocks.get(hash_id)
        if block is None:
            rng = random.Random(f"{self.salt}:{hash_id}")
            block = self._blocks[hash_id] = [self._unit(rng) for _ in range(self.block_size)]
        return block

    def _unit(self, rng: random.Random):
        return rng.choice(WORDS) if self.text else rng.randrange(MIN_TOKEN_ID, self.vocab)

    def build(self, job: Job, rng: random.Random) -> str | list[int]:
        units = [u for h in job.hash_ids for u in self._block(h)][: job.input_len]
        units += [self._unit(rng) for _ in range(job.input_len - len(units))]
        return " ".join(units) if self.text else units


# ---- clients -------------------------------------------------------------------------------


class GrpcClient:
    def __init__(self, target: str, api_key: str | None, tls_ca: str | None, text: bool) -> None:
        import grpc

        from llmrpc.services import rpc
        from llmrpc.v1 import generation_pb2, generation_pb2_grpc

        self.grpc, self.pb = grpc, generation_pb2
        credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None
        self.channel = rpc.channel(target, credentials)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.text = text

    async def model_info(self) -> dict:
        info = await self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=30, metadata=self.metadata)
        return {"model": info.model_name, "context_length": info.context_length, "vocab_size": info.vocab_size}

    async def run(self, job: Job, prompt: str | list[int]) -> Outcome:
        pb = self.pb
        request = pb.GenerateRequest(sampling=pb.SamplingParams(
            max_tokens=job.output_len, ignore_eos=True, temperature=0.0))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.tokens.ids.extend(prompt)
        out = Outcome(start=time.perf_counter())
        events = []
        try:
            async for response in self.stub.Generate(request, metadata=self.metadata, timeout=3600):
                events.append((time.perf_counter(), len(response.token_ids)))
                if response.HasField("usage"):
                    out.cached_tokens = response.usage.cached_prompt_tokens
        except self.grpc.aio.AioRpcError as exc:
            out.status, out.error = exc.code().name, exc.details() or ""
        out.end = time.perf_counter()
        out.take(events)
        return out

    async def close(self) -> None:
        await self.channel.close()


def _spread(counts: list[tuple[int, bool]], total: int) -> list[int]:
    """Per-event token counts (exact ones kept) made to add up to the `total` the final usage reports.

    The tokens no event accounted for are spread one at a time over the inexact events after the
    first (an event that reports nothing of its size carries at least one token), round robin.
    """
    out = [n for n, _ in counts]
    loose = [i for i, (_, exact) in enumerate(counts) if not exact and i > 0] or [len(out) - 1]
    missing = total - sum(out)
    for k in range(abs(missing)):
        i = loose[k % len(loose)]
        out[i] += 1 if missing > 0 else -(out[i] > 1)
    return out


class HttpClient:
    """OpenAI /v1/completions with stream=true, read as server-sent events."""

    def __init__(self, base_url: str, api_key: str | None, tls_ca: str | None, text: bool) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.base = base_url.rstrip("/")
        if "://" not in self.base:
            self.base = ("https://" if tls_ca else "http://") + self.base
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ssl_context: ssl.SSLContext | bool = ssl.create_default_context(cafile=tls_ca) if tls_ca else True
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context),
                                             timeout=aiohttp.ClientTimeout(total=3600))
        self.text = True  # OpenAI-compatible routes do not all take token ids
        self.model = ""

    async def model_info(self) -> dict:
        async with self.session.get(f"{self.base}/v1/models", headers=self.headers) as answer:
            answer.raise_for_status()
            model = (await answer.json())["data"][0]
        self.model = model["id"]
        return {"model": model["id"], "context_length": model.get("max_model_len", 0), "vocab_size": 0}

    async def run(self, job: Job, prompt: str | list[int]) -> Outcome:
        body = {"model": self.model, "prompt": prompt, "max_tokens": job.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        out = Outcome(start=time.perf_counter())
        times, counts, total = [], [], None  # per event: arrival, (tokens, exact?)
        try:
            async with self.session.post(f"{self.base}/v1/completions", json=body, headers=self.headers) as answer:
                if answer.status != 200:
                    out.status, out.error = f"HTTP_{answer.status}", (await answer.text())[:500]
                    out.end = time.perf_counter()
                    return out
                async for raw in answer.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    now, chunk = time.perf_counter(), json.loads(line[5:])
                    if "error" in chunk:  # a stream that broke after it started
                        out.status, out.error = "STREAM_ERROR", str(chunk["error"])[:500]
                        continue
                    usage = chunk.get("usage")
                    if usage:
                        total = usage.get("completion_tokens")
                        out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    for choice in chunk.get("choices") or ():
                        tokens = (choice.get("logprobs") or {}).get("tokens")
                        if tokens is not None:
                            counts.append((len(tokens), True))
                        elif usage and total is not None:  # per-event usage (vLLM's continuous usage)
                            counts.append((total - sum(n for n, _ in counts), True))
                        elif choice.get("text"):
                            counts.append((1, False))
                        else:
                            continue
                        times.append(now)
        except self.aiohttp.ClientError as exc:
            out.status, out.error = type(exc).__name__, str(exc)[:500]
        out.end = time.perf_counter()
        if counts:
            out.take(list(zip(times, _spread(counts, total) if total is not None else [n for n, _ in counts])))
        return out

    async def close(self) -> None:
        await self.session.close()


# ---- one load level ------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One load level: its label, the offered load it is plotted at, and how requests are sent."""

    label: str
    offered: float  # clients (closed loop) or requests/s (open loop)
    concurrency: int | None = None  # closed loop: this many clients
    max_concurrency: int | None = None  # open loop: at most this many requests in flight


class Progress:
    """A live status line on stderr."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total = label, total
        self.done = self.errors = self.tokens = 0
        self.start = time.perf_counter()

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.errors += outcome.status != "OK"
        self.tokens += outcome.output_tokens

    def show(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.label}: {self.done}{total} done, {self.errors} errors, "
                         f"{self.tokens / max(elapsed, 1e-9):.1f} tok/s, {elapsed:.1f} s   " + ("\n" if final else ""))
        sys.stderr.flush()


@dataclass
class Record:
    """One request of a level, as exported: what was asked, when, and what it measured."""

    job: Job
    sent_s: float  # from the level's start
    outcome: Outcome


async def run_level(client, jobs: Iterator[Job] | list[Job], level: Level, prompts: Prompts, seed: int,
                    duration_s: float | None = None, quiet: bool = False) -> tuple[list[Record], float, int]:
    """Sends the jobs closed-loop or at their arrival times; (records, seconds, peak requests in flight).

    With `duration_s`, no request is sent after that many seconds; those in flight still finish,
    and the level lasts until the later of the two.
    """
    rng = random.Random(seed)
    records: list[Record] = []
    progress = Progress(level.label, len(jobs) if isinstance(jobs, list) and not duration_s else None)
    in_flight = peak = 0
    start = time.perf_counter()
    deadline = start + duration_s if duration_s else float("inf")
    gate = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None

    async def one(job: Job) -> None:
        nonlocal in_flight, peak
        prompt = prompts.build(job, rng)
        if gate is not None:
            await gate.acquire()  # the request's clock starts when it is sent, as vLLM's does
        in_flight += 1
        peak = max(peak, in_flight)
        sent = time.perf_counter() - start
        try:
            outcome = await client.run(job, prompt)
        finally:
            in_flight -= 1
            if gate is not None:
                gate.release()
        records.append(Record(job, sent, outcome))
        progress.update(outcome)

    async def ticker() -> None:
        while not quiet:
            progress.show()
            await asyncio.sleep(0.5)

    tick = asyncio.create_task(ticker())
    source = iter(jobs)
    if level.concurrency:
        async def client_loop() -> None:
            for job in source:
                if time.perf_counter() >= deadline:
                    return
                await one(job)

        await asyncio.gather(*(client_loop() for _ in range(level.concurrency)))
    else:
        tasks = []
        for job in source:
            due = start + job.arrival_s
            if due >= deadline:
                break
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            tasks.append(asyncio.create_task(one(job)))
        await asyncio.gather(*tasks)
    # A timed level is that long at least: its last request may end before the window does.
    duration = max(time.perf_counter() - start, duration_s or 0.0)
    tick.cancel()
    if not quiet:
        progress.show(final=True)
    return records, duration, peak


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:3000` (ms) → {"ttft": 500.0, ...}; the keys vLLM's --goodput takes."""
    slos = {}
    for pair in pairs or ():
        key, sep, value = pair.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS and e2el:MS, got {pair!r}")
        slos[key] = float(value)
    return slos


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """vLLM's keys for one metric: mean_/median_/std_/pNN_ + name + _ms."""
    a = np.asarray(values_s, dtype=float) * 1e3
    empty = a.size == 0
    out = {f"mean_{name}_ms": None if empty else float(a.mean()),
           f"median_{name}_ms": None if empty else float(np.median(a)),
           f"std_{name}_ms": None if empty else float(a.std())}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = None if empty else float(np.percentile(a, p))
    return out


def _good(outcome: Outcome, slos: dict[str, float]) -> bool:
    values = {"ttft": outcome.ttft, "tpot": outcome.tpot, "e2el": outcome.e2el}
    return outcome.status == "OK" and all((value := values[k]) is not None and value * 1e3 <= slo
                                          for k, slo in slos.items())


def _peak_tokens_per_s(ok: list[Outcome]) -> float:
    """The most output tokens that arrived in any one second (vLLM's max_output_tokens_per_s)."""
    times = [t for o in ok if o.first_token is not None
             for t in (o.first_token + np.concatenate([[0.0], np.cumsum(o.gaps)])).tolist()]
    if not times:
        return 0.0
    origin = min(o.start for o in ok)
    return float(np.bincount(((np.asarray(times) - origin) // 1.0).astype(int)).max())


def summarize(records: list[Record], duration: float, peak: int, slos: dict[str, float],
              percentiles: list[float]) -> dict:
    outcomes = [r.outcome for r in records]
    ok = [o for o in outcomes if o.status == "OK"]
    input_tokens = sum(r.job.input_len for r in records if r.outcome.status == "OK")
    output = sum(o.output_tokens for o in ok)
    cached = [o.cached_tokens for o in ok if o.cached_tokens is not None]
    summary = {
        "num_prompts": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": sorted({f"{o.status}: {o.error}" for o in outcomes if o.status != "OK"}),
        "duration": duration, "total_input_tokens": input_tokens, "total_output_tokens": output,
        "expected_output_tokens": sum(r.job.output_len for r in records),
        "request_throughput": len(ok) / duration,
        "request_goodput": sum(_good(o, slos) for o in outcomes) / duration if slos else None,
        "output_throughput": output / duration, "total_token_throughput": (input_tokens + output) / duration,
        "max_output_tokens_per_s": _peak_tokens_per_s(ok), "max_concurrent_requests": peak,
        "total_cached_tokens": sum(cached) if cached else None,
        "prefix_cache_hit_rate": sum(cached) / input_tokens if cached and input_tokens else None,
    }
    for name, values in (("ttft", [t for o in ok if (t := o.ttft) is not None]),
                         ("tpot", [t for o in ok if o.output_tokens > 1 and (t := o.tpot) is not None]),
                         ("itl", [g for o in ok for g in o.gaps]),
                         ("e2el", [o.e2el for o in ok])):
        summary.update(_stats(name, values, percentiles))
    return summary


def export_rows(label: str, records: list[Record], slos: dict[str, float]) -> Iterator[dict]:
    """One JSON row per request, in the order sent."""
    for r in sorted(records, key=lambda r: r.sent_s):
        o = r.outcome
        ms = lambda s: None if s is None else s * 1e3  # noqa: E731
        yield {"level": label, "arrival_s": r.job.arrival_s, "sent_s": r.sent_s, "input_len": r.job.input_len,
               "output_len": r.job.output_len, "num_hash_ids": len(r.job.hash_ids), "status": o.status,
               "error": o.error or None, "output_tokens": o.output_tokens, "cached_tokens": o.cached_tokens,
               "ttft_ms": ms(o.ttft), "tpot_ms": ms(o.tpot), "e2el_ms": ms(o.e2el),
               "itl_ms": [g * 1e3 for g in o.gaps], "good": _good(o, slos) if slos else None}


# ---- report ------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    """Each latency (p50, p99), throughput and goodput against the offered load of its level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [lv["offered_load"] for lv in levels]
    closed = report["mode"] == "closed"
    xlabel = "concurrency (clients)" if closed else "offered load (requests/s)"
    if not closed and any(v == float("inf") for v in x):  # rate inf: place it past the finite ones
        finite = [v for v in x if v != float("inf")] or [1.0]
        x = [v if v != float("inf") else 2 * max(finite) for v in x]
    pct = report["percentiles"][-1]
    word = str(int(pct)) if int(pct) == pct else str(pct)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, name in zip(axes.flat, METRICS):
        for key, style in ((f"median_{name}_ms", "o-"), (f"p{word}_{name}_ms", "s--")):
            ax.plot(x, [lv[key] if lv[key] is not None else np.nan for lv in levels], style,
                    label=key.split("_")[0].replace("median", "p50"))
        slo = report["goodput"].get(name)
        if slo:
            ax.axhline(slo, color="#d62728", lw=0.8, ls=":", label="SLO")
        ax.set_title(METRICS[name])
        ax.set_ylabel("ms")
    ax = axes.flat[4]
    ax.plot(x, [lv["request_throughput"] for lv in levels], "o-", label="throughput")
    if report["goodput"]:
        ax.plot(x, [lv["request_goodput"] for lv in levels], "s-", label="goodput")
    ax.set_title("requests/s completed")
    ax = axes.flat[5]
    ax.plot(x, [lv["output_throughput"] for lv in levels], "o-", label="output")
    ax.set_title("output tokens/s")
    for ax in axes.flat:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        for xi, lv in zip(x, levels):
            ax.annotate(lv["label"], (xi, ax.get_ylim()[0]), fontsize=6, textcoords="offset points", xytext=(2, 2))
    fig.suptitle(f"{report['model'].get('model', '')} via {report['api']} {report['target']} — {report['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _levels(args: argparse.Namespace) -> tuple[str, list[Level]]:
    if args.trace:
        return "trace", [Level(f"x{v:g} time", 0.0, max_concurrency=args.max_concurrency)
                         for v in (float(s) for s in args.time_scale.split(","))]
    if args.rate:
        return "poisson" if args.burstiness == 1.0 else "gamma", [
            Level(f"{v:g} req/s", v, max_concurrency=args.max_concurrency)
            for v in (float(s) for s in args.rate.split(","))]
    clients = [int(s) for s in (args.concurrency or "1").split(",")]
    return "closed", [Level(f"c={v}", float(v), concurrency=v) for v in clients]


def _jobs(args: argparse.Namespace, mode: str, level: Level, index: int, context: int) -> Iterator[Job] | list[Job]:
    """A level's jobs: the (time-scaled) trace, or synthetic ones, endless with --duration."""
    if mode == "trace":
        scale = float(args.time_scale.split(",")[index])
        base = read_trace(Path(args.trace), args.trace_time_unit)[: args.num_requests or None]
        jobs = [Job(j.arrival_s * scale, j.input_len, j.output_len, j.hash_ids) for j in base]
        return fit_to_context(jobs, context) if context else jobs
    rate = None if mode == "closed" else level.offered
    source = synthetic_jobs(rate, args.input_len, args.output_len, args.seed + index, args.burstiness)
    if context:
        source = (fit_to_context([j], context)[0] for j in source)
    return source if args.duration else list(itertools.islice(source, args.num_requests))


def _offered(mode: str, level: Level, jobs: list[Job] | Iterator[Job]) -> float:
    """The level's offered load: its clients or rate, or a trace's arrivals per second."""
    if mode != "trace" or not isinstance(jobs, list):
        return level.offered
    span = jobs[-1].arrival_s - jobs[0].arrival_s if len(jobs) > 1 else 0.0
    return (len(jobs) - 1) / span if span > 0 else float("inf")


async def run(args: argparse.Namespace) -> dict:
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    client = (HttpClient if args.api == "http" else GrpcClient)(args.target, args.api_key, args.tls_ca, args.text)
    exported: list[dict] = []
    try:
        model = await client.model_info()
        context, vocab = model.get("context_length") or 0, model.get("vocab_size") or 0
        text = client.text or args.text
        mode, levels = _levels(args)
        if args.warmup:
            warm = Level("warm-up", 0.0, concurrency=min(args.warmup, args.max_concurrency or args.warmup))
            source = synthetic_jobs(None, args.input_len, args.output_len, args.seed - 1)
            warm_jobs = list(itertools.islice(source, args.warmup))
            await run_level(client, fit_to_context(warm_jobs, context) if context else warm_jobs, warm,
                            Prompts(vocab, text, args.trace_block_size, f"{args.seed}:warm-up"), args.seed - 1)
        results = []
        for i, level in enumerate(levels):
            jobs = _jobs(args, mode, level, i, context)
            prompts = Prompts(vocab, text, args.trace_block_size, f"{args.seed}:{i}")  # no level reuses another's
            records, duration, peak = await run_level(client, jobs, level, prompts, args.seed + i, args.duration)
            offered = _offered(mode, level, jobs)
            results.append({"label": level.label, "offered_load": offered,
                            "request_rate": None if mode == "closed" else offered,
                            "max_concurrency": level.concurrency or level.max_concurrency,
                            "burstiness": None if mode == "closed" else args.burstiness,
                            **summarize(records, duration, peak, slos, percentiles)})
            if args.export_requests:
                exported.extend(export_rows(level.label, records, slos))
    finally:
        await client.close()
    return {
        **provenance("llmrpc.bench.load"),
        "target": args.target, "api": args.api, "mode": mode, "model": model,
        "workload": {"num_requests": args.num_requests, "duration_s": args.duration, "warmup": args.warmup,
                     "input_len": args.input_len, "output_len": args.output_len, "trace": args.trace,
                     "trace_block_size": args.trace_block_size, "text": text, "seed": args.seed},
        "goodput": slos, "percentiles": percentiles, "levels": results, "requests": exported,
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
    load.add_argument("--rate", help="open loop: comma-separated arrival rates (requests/s, `inf`: all at once)")
    load.add_argument("--trace", help="open loop: replay this JSONL trace (Bailian or Mooncake format)")
    p.add_argument("--max-concurrency", type=int, default=None, help="open loop: at most this many in flight")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="open loop: gamma shape of the arrival gaps (1: Poisson; lower: burstier)")
    p.add_argument("--time-scale", default="1", help="trace levels: comma-separated factors on every arrival gap")
    p.add_argument("--trace-time-unit", choices=["s", "ms"], default="s", help="ms for Mooncake traces")
    p.add_argument("--trace-block-size", type=int, default=16,
                   help="prompt tokens per hash id (Bailian: 16 = llmrpc's page size; Mooncake: 512)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level (trace: first N rows, 0: all)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per level: requests are sent until then (overrides --num-requests)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent before the first level")
    p.add_argument("--input-len", default="128", help="tokens (or words with --text): N or LO:HI")
    p.add_argument("--output-len", default="32", help="tokens: N or LO:HI")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs a good request meets: ttft, tpot, e2el (ms)")
    p.add_argument("--metric-percentiles", default="50,90,99", help="comma-separated percentiles to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    p.add_argument("--export-requests", action="store_true", help="with --out: every request in OUT.requests.jsonl")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.export_requests and not args.out:
        raise SystemExit("--export-requests needs --out")
    report = asyncio.run(run(args))
    pct = report["percentiles"][-1]
    word = str(int(pct)) if int(pct) == pct else str(pct)
    for lv in report["levels"]:
        goodput = f" goodput {lv['request_goodput']:.2f} req/s" if lv["request_goodput"] is not None else ""
        line = " | ".join(f"{name.upper()} p50/p{word} {lv[f'median_{name}_ms'] or 0:.1f}/"
                          f"{lv[f'p{word}_{name}_ms'] or 0:.1f} ms" for name in METRICS)
        print(f"{lv['label']:>12}: {lv['completed']}/{lv['num_prompts']} ok, {lv['request_throughput']:.2f} req/s"
              f"{goodput}, {lv['output_throughput']:.1f} tok/s | {line}")
    if args.out:
        out = Path(args.out)
        rows = report.pop("requests")
        write_json(out.with_suffix(".json"), report)
        plot(report, out.with_suffix(".png"))
        if args.export_requests:
            path = out.with_suffix(".requests.jsonl")
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            print(f"wrote {path}")
        print(f"wrote {out.with_suffix('.png')}")
    else:
        report.pop("requests")
    return report


if __name__ == "__main__":
    main()
