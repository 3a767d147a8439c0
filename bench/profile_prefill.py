"""Where a first token's time goes: one 2,048-token prefill through the engine, by phase and by kernel.

Runs services/llm.py's LLM (the engine alone, as bench/latency.py's engine mode) on fresh prompts of
--tokens tokens, one token out. For each of --repeats prefills it splits the wall clock of the step
into host phases (prepare: the pages appended, the batch built with the admissions, the attention plan;
forward: queueing the model's kernels; sample; the wait for the token on the host) and the GPU's own time
for the forward and sample (CUDA events), as started and again after gc.freeze(), then profiles one more
prefill with the torch profiler and prints its kernels by GPU time and its host operations by CPU time.
When the forward's host time is above its GPU time, the prefill is bound by launching kernels, not by
running them.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

from llmrpc.bench.offline import add_engine_args, engine_llm
from llmrpc.engine.runner import PendingOutput
from llmrpc.engine.step import Step
from llmrpc.services.llm import LLM
from llmrpc.v1.generation_pb2 import SamplingParams


class PhasedLLM(LLM):
    """Times each step's host phases (perf_counter) and its GPU work (CUDA events around it); inside
    prepare, the pool's page appends and the attention plan, timed by wrapping those two calls."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.phases: list[dict[str, float]] = []
        self._inner: dict[str, float] = {}
        r = self.runner
        r.kv_pool.append_pages = self._timed(r.kv_pool.append_pages, "pages_ms")  # type: ignore[method-assign]
        r.attention.plan = self._timed(r.attention.plan, "plan_ms")  # type: ignore[method-assign]

    def _timed(self, call, key: str):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self._inner[key] = self._inner.get(key, 0.0) + 1e3 * (time.perf_counter() - t)
        return timed

    def launch(self, step: Step) -> PendingOutput:
        r = self.runner
        self._inner = {"pages_ms": 0.0, "plan_ms": 0.0}
        t0 = time.perf_counter()
        batch = r.prepare(step)
        assert batch is not None
        t1 = time.perf_counter()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        logits = r.forward(batch)
        mid.record()
        t2 = time.perf_counter()
        pending = r.sample_async(batch, logits)
        end.record()
        t3 = time.perf_counter()
        pending.result()  # the token on the host (later reads of it are free)
        t4 = time.perf_counter()
        inner = self._inner
        self.phases.append({"prepare_ms": 1e3 * (t1 - t0), **inner,
                            "batch_ms": 1e3 * (t1 - t0) - inner["pages_ms"] - inner["plan_ms"],
                            "forward_host_ms": 1e3 * (t2 - t1),
                            "sample_host_ms": 1e3 * (t3 - t2), "wait_ms": 1e3 * (t4 - t3),
                            "step_wall_ms": 1e3 * (t4 - t0), "forward_gpu_ms": start.elapsed_time(mid),
                            "sample_gpu_ms": mid.elapsed_time(end)})
        return pending


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    llm = engine_llm(args, PhasedLLM, overlap_depth=0)
    assert isinstance(llm, PhasedLLM)
    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def prefill() -> float:
        prompt = [rng.randint(0, 10000) for _ in range(args.tokens)]  # fresh: no prefix-cache hit
        t = time.perf_counter()
        llm.generate([prompt], one)
        return 1e3 * (time.perf_counter() - t)

    def measure(label: str) -> dict:
        """Median phases of --repeats prefills, with the collector's runs and the allocator's cudaMallocs
        during them."""
        llm.phases.clear()
        collections = sum(g["collections"] for g in gc.get_stats())
        mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
        walls = [prefill() for _ in range(args.repeats)]
        phases = {k: round(statistics.median(p[k] for p in llm.phases), 3) for k in llm.phases[0]}
        report = {"label": label, "tokens": args.tokens, "ttft_wall_ms": round(statistics.median(walls), 3),
                  "ttft_wall_all_ms": [round(w, 2) for w in walls], **phases,
                  "gc_collections": sum(g["collections"] for g in gc.get_stats()) - collections,
                  "cuda_mallocs": torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs}
        print("PHASES " + json.dumps(report), flush=True)
        return report

    for _ in range(3):
        prefill()
    reports = [measure("as started")]
    gc.collect()
    gc.freeze()  # what has lived through start-up is never scanned again
    reports.append(measure("after gc.freeze()"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill()
    averages = prof.key_averages()
    kernels = sum(e.count for e in averages if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    print(f"kernels launched: {kernels}")
    print(averages.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
