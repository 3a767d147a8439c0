"""Where a decode step's GPU time goes: torch profiler over a few full-batch decode steps of the offline workload.

Runs the engine (services/llm.py's LLM, as bench/offline.py's engine mode) until every request
is decoding, profiles the next --steps steps and prints the kernels by total GPU time.
"""
from __future__ import annotations

import argparse

import torch

from llmrpc.bench.offline import add_engine_args, engine_llm, workload_sampling
from llmrpc.bench.workload import offline_workload
from llmrpc.engine.step import Step
from llmrpc.services.llm import LLM
from llmrpc.services.scheduler.pipeline import PendingStep


class ProfiledLLM(LLM):
    """Starts the profiler at the first step that decodes a full batch with nothing left waiting."""

    def __init__(self, *args, batch: int, **options) -> None:
        super().__init__(*args, **options)
        self.batch = batch
        self.profiler: torch.profiler.profile | None = None
        self.profiled = 0  # steps launched since the profiler started

    def launch(self, step: Step) -> PendingStep:
        if self.profiler is None and step.num_decode == step.num_rows == self.batch and not self.scheduler.num_waiting:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        if self.profiler is not None:
            self.profiled += 1
        return super().launch(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs: see each kernel's launch")
    args = ap.parse_args()
    if args.eager:
        args.cuda_graph_max_bs = 0
    workload = offline_workload()
    llm = engine_llm(args, ProfiledLLM, batch=min(args.max_slots, len(workload.prompts)))
    assert isinstance(llm, ProfiledLLM)
    for _ in llm.stream(workload.prompts, workload_sampling(workload)):
        if llm.profiled >= args.steps:
            break  # the rest is aborted
    torch.cuda.synchronize()
    assert llm.profiler is not None, "no step decoded a full batch"
    llm.profiler.__exit__(None, None, None)
    print(llm.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
