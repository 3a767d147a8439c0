"""Scheduler CPU time per decode step, without a worker: the core driven against the FakeWorker.

For each batch size B it admits B requests (128-token prompts, ignore_eos), runs
their prefill, then times the decode steps of the servicer's own loop (StepPipeline,
one step in flight): `next_step` (build step N+1), `encode_step` (pack it for the
wire) and `on_step_output` (map step N's tokens to requests). The FakeWorker's own
time is not counted. Target: next_step + on_step_output under 1 ms at B = 256.

cache "full": the prefix cache first fills the whole pool with other prompts, so
every page the batch takes (prompts, then a new page per request every 16 decode
steps) is an LRU eviction, as on a server that has been up a while.

  python -m llmrpc.bench.scheduler_overhead [--quick] [--out bench/results/scheduler_overhead.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from llmrpc.bench.record import provenance, write_json
from llmrpc.bench.fake_worker import Executed, FakeWorker, HashModel
from llmrpc.engine.step import Step
from llmrpc.services.protocol import encode_step
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.pipeline import StepPipeline
from llmrpc.services.scheduler.request import TokenEvent
from llmrpc.services.scheduler.request import Request
from llmrpc.services.scheduler.scheduler import Scheduler

PROMPT_LEN = 128
PAGE_SIZE = 16
VOCAB = 32000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scheduler_overhead.json"


def _fill_cache(sched: Scheduler, worker: FakeWorker, rng: np.random.Generator) -> None:
    """Runs one-token requests with distinct prompts until the prefix cache starts evicting."""
    i = 0
    pipeline = StepPipeline(sched, worker.launch, depth=0)
    while sched.metrics.evicted_pages == 0:
        sched.add_request(Request(f"fill{i}", rng.integers(0, VOCAB, PROMPT_LEN + 1).tolist(), max_tokens=1))
        i += 1
        for _ in pipeline.run():
            pass


class _Timed:
    """The core and the worker as the pipeline sees them, with the CPU time of each part of a
    full decode step recorded (the FakeWorker's own time left out)."""

    def __init__(self, sched: Scheduler, worker: FakeWorker, batch: int) -> None:
        self.sched, self.worker, self.batch = sched, worker, batch
        self.build: list[int] = []
        self.encode: list[int] = []
        self.output: list[int] = []
        self._decoding: set[int] = set()  # ids of the timed steps

    def next_step(self) -> Step | None:
        t0 = _clock()
        step = self.sched.next_step()
        t1 = _clock()
        if step is not None and step.num_decode == self.batch:
            self._decoding.add(step.step_id)
            self.build.append(t1 - t0)
        return step

    def launch(self, step: Step) -> Executed:
        t0 = _clock()
        encode_step(step)  # timed: the servicer packs every step for the wire
        if step.step_id in self._decoding:
            self.encode.append(_clock() - t0)
        return self.worker.launch(step)

    def on_step_output(self, step_id: int, *arrays) -> list[TokenEvent]:
        t0 = _clock()
        events = self.sched.on_step_output(step_id, *arrays)
        if step_id in self._decoding:
            self.output.append(_clock() - t0)
        return events


_clock = time.thread_time_ns  # CPU time of this thread: others' load on the machine does not count


def measure(batch: int, steps: int, full_cache: bool = False, seed: int = 0) -> dict:
    """Per-step CPU time (µs) of the scheduler's parts over `steps` decode steps of `batch` rows."""
    max_tokens = steps + 8
    num_pages = batch * -(-(PROMPT_LEN + max_tokens) // PAGE_SIZE)
    sched = Scheduler(SchedulerConfig(num_pages=num_pages, page_size=PAGE_SIZE, max_slots=batch,
                                      context_length=PROMPT_LEN + max_tokens, eos_token_ids=(2,)))
    worker = FakeWorker(num_pages, PAGE_SIZE, batch, HashModel(VOCAB, seed), verify=False)
    rng = np.random.default_rng(seed)
    if full_cache:
        _fill_cache(sched, worker, rng)
    evicted_before = sched.metrics.evicted_pages
    for i in range(batch):
        sched.add_request(Request(f"r{i}", rng.integers(0, VOCAB, PROMPT_LEN).tolist(),
                                  max_tokens=max_tokens, ignore_eos=True))
    timed = _Timed(sched, worker, batch)
    # Overlap: step N's output is read after step N+1 is built, as in the servicer.
    for _ in StepPipeline(timed, timed.launch, depth=1).run():
        if len(timed.build) >= steps:
            break
    build, encode, output = timed.build, timed.encode, timed.output
    us = lambda xs: statistics.median(xs) / 1e3  # noqa: E731
    return {
        "batch": batch,
        "cache": "full" if full_cache else "empty",
        "evicted_pages": sched.metrics.evicted_pages - evicted_before,
        "steps": len(build),
        "next_step_us": us(build),
        "on_step_output_us": us(output),
        "encode_step_us": us(encode),
        "scheduler_us": us(build) + us(output),
        "p99_scheduler_us": float(np.percentile(np.add(build[: len(output)], output), 99)) / 1e3,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed per batch size")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    batches = [1, 256] if args.quick else [1, 32, 64, 128, 256]
    steps = args.steps or (20 if args.quick else 200)
    rows = [measure(b, steps) for b in batches] + [measure(256, steps, full_cache=True)]
    print(f"{'batch':>6} {'cache':>6} {'next_step':>10} {'on_output':>10} {'scheduler':>10} {'p99':>8} "
          f"{'encode':>8}   (µs of CPU per decode step, median)")
    for r in rows:
        print(f"{r['batch']:>6} {r['cache']:>6} {r['next_step_us']:>10.1f} {r['on_step_output_us']:>10.1f} "
              f"{r['scheduler_us']:>10.1f} {r['p99_scheduler_us']:>8.1f} {r['encode_step_us']:>8.1f}")
    result = {
        "benchmark": "scheduler_overhead",
        **provenance("llmrpc.bench.scheduler_overhead", argv, numpy=np.__version__),
        "config": {"prompt_len": PROMPT_LEN, "page_size": PAGE_SIZE, "steps": steps, "overlap": True,
                   "clock": "thread CPU time, median over steps"},
        "results": rows,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
