"""Where a decode step's GPU time goes: torch profiler over a few full-batch decode steps of the offline workload.

Runs the engine (scheduler core + ModelRunner, as bench/offline.py's engine mode) until every request
is decoding, profiles the next --steps steps and prints the kernels by total GPU time.
"""
from __future__ import annotations

import argparse
from collections import deque

import torch

from llmrpc.bench.offline import _engine_config, _requests
from llmrpc.bench.workload import offline_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs: see each kernel's launch")
    args = ap.parse_args()
    if args.eager:
        args.cuda_graph_max_bs = 0
    from llmrpc.engine.runner import ModelRunner
    from llmrpc.services.scheduler.config import SchedulerConfig
    from llmrpc.services.scheduler.scheduler import Scheduler

    runner = ModelRunner(_engine_config(args))
    i = runner.info
    core = Scheduler(SchedulerConfig(num_pages=i.num_pages, page_size=i.page_size, max_slots=i.max_slots,
                                     context_length=i.context_length, eos_token_ids=i.eos_token_ids))
    for r in _requests(offline_workload(), "r"):
        core.add_request(r)
    in_flight: deque = deque()
    prof = None
    profiled = 0
    while profiled < args.steps:
        step = core.next_step()
        if prof is None and step.num_decode == step.num_rows == 256 and not core.num_waiting:
            torch.cuda.synchronize()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        in_flight.append(runner.launch(step))
        if prof is not None:
            profiled += 1
        while len(in_flight) > 1:
            out = in_flight.popleft().result()
            core.on_step_output(out.step_id, out.tokens)
    torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
