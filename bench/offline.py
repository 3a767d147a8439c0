"""Offline throughput on the nano-vllm / mini-sglang workload (bench/workload.py): output tokens/s.

Systems, each timed on the same 256 requests (all submitted at once) after a warm-up:
  engine    the scheduler core + ModelRunner in this process, no gRPC (one step in flight ahead; and none)
  stack     `llmrpc worker` + `llmrpc scheduler` processes; 256 concurrent Generate calls with tokens
            (once per --overlap-depths value, the scheduler restarted against the same worker)
  hf        transformers continuous batching (generate with paged attention), per-request max_new_tokens
  roofline  bench/roofline.py's ceiling from bandwidth and matmul rates measured in this run
Rows go to --out as JSON (a list), one per system.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from llmrpc.bench.record import hardware
from llmrpc.bench.workload import TEMPERATURE, Workload, offline_workload
from llmrpc.engine.runner import PendingOutput

if TYPE_CHECKING:
    from llmrpc.services.scheduler.request import TokenEvent


def _row(args: argparse.Namespace, system: str, tok_s: float, **extra) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "benchmark": "offline", "model": Path(args.model).name, "system": system,
        "output_tokens_per_s": round(tok_s, 1), "tp": 1, "gpu": gpu, "hardware": hardware(gpu=gpu),
        "command": " ".join(["python -m llmrpc.bench.offline", *sys.argv[1:]]),
        "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# ---- (b) the engine alone --------------------------------------------------------------


def _engine_config(args: argparse.Namespace):
    from llmrpc.engine.config import EngineConfig

    return EngineConfig(model_path=args.model, device=args.device, load_format="dummy", max_slots=args.max_running,
                        attention_backend=args.attention_backend, cuda_graph_max_bs=args.cuda_graph_max_bs,
                        max_context=args.max_context)


def run_engine_loop(runner, core, depth: int, timeline: list | None = None,
                    on_event: Callable[[TokenEvent], None] | None = None) -> int:
    """Drives `core` with up to `depth` steps in flight beyond the oldest unread one, until every
    request finishes; returns the output tokens produced. `on_event` sees each token event as it lands."""
    in_flight: deque = deque()
    produced = 0
    while True:
        step = core.next_step()
        if step is None:
            if not in_flight:
                return produced
        elif timeline is None:
            in_flight.append(runner.launch(step))
        else:
            # The same as launch(), with events around the GPU work: prepare is host work the GPU may wait for.
            batch = runner.prepare(step)
            if batch is None:
                in_flight.append(PendingOutput(step.step_id, {}, None))
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            in_flight.append(runner.sample_async(batch, runner.forward(batch)))
            end.record()
            timeline.append((step.num_decode == step.num_rows, start, end))
        while in_flight and (len(in_flight) > depth or step is None):
            out = in_flight.popleft().result()
            for event in core.on_step_output(out.step_id, out.tokens):
                produced += len(event.token_ids)
                if on_event is not None:
                    on_event(event)
            if step is None:
                break


def _requests(workload: Workload, prefix: str):
    from llmrpc.services.scheduler.request import Request, Sampling

    return [Request(f"{prefix}{i}", tuple(p), Sampling(temperature=TEMPERATURE), max_tokens=m, ignore_eos=True)
            for i, (p, m) in enumerate(zip(workload.prompts, workload.max_tokens))]


def bench_engine(args: argparse.Namespace, workload: Workload) -> dict:
    from llmrpc.engine.runner import ModelRunner
    from llmrpc.services.scheduler.config import SchedulerConfig
    from llmrpc.services.scheduler.scheduler import Scheduler

    runner = ModelRunner(_engine_config(args))
    info = runner.info

    def core() -> Scheduler:
        return Scheduler(SchedulerConfig(num_pages=info.num_pages, page_size=info.page_size, max_slots=info.max_slots,
                                         context_length=info.context_length, eos_token_ids=info.eos_token_ids,
                                         max_prefill_tokens=args.max_prefill_tokens, overlap=not args.disable_overlap))

    warm = core()
    for r in _requests(Workload([p[:200] for p in workload.prompts[:64]], [40] * 64), "warm"):
        warm.add_request(r)
    run_engine_loop(runner, warm, 0 if args.disable_overlap else 1)
    results = {}
    for overlap in ([False] if args.disable_overlap else [True, False]):
        c = core()
        for r in _requests(workload, "r"):
            c.add_request(r)
        timeline: list = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        produced = run_engine_loop(runner, c, int(overlap), timeline)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        assert produced == workload.output_tokens, (produced, workload.output_tokens)
        # GPU idle between consecutive decode steps: end of one step's work to the start of the next.
        gaps, busy = [], 0.0
        for (dec_a, _, end_a), (dec_b, start_b, end_b) in zip(timeline, timeline[1:]):
            if dec_a and dec_b:
                gaps.append(max(end_a.elapsed_time(start_b), 0.0))
        for _, s, e in timeline:
            busy += s.elapsed_time(e)
        results[overlap] = dict(wall_s=round(wall, 3), steps=len(timeline),
                                decode_gap_us_mean=round(1e3 * float(np.mean(gaps)), 1) if gaps else None,
                                decode_gap_us_p50=round(1e3 * float(np.median(gaps)), 1) if gaps else None,
                                gpu_idle_fraction=round(1 - busy / 1e3 / wall, 4),
                                tok_s=workload.output_tokens / wall)
        print(f"engine overlap={overlap}: {results[overlap]}", flush=True)
    del runner
    torch.cuda.empty_cache()
    main = results[not args.disable_overlap]
    rows = [_row(args, "llmrpc-engine", main.pop("tok_s"), overlap=not args.disable_overlap, **main)]
    if not args.disable_overlap and False in results:
        ab = results[False]
        rows.append(_row(args, "llmrpc-engine", ab.pop("tok_s"), overlap=False, **ab))
    return rows


# ---- (a) the full stack -----------------------------------------------------------------


_CLI = [sys.executable, "-m", "llmrpc.services.cli"]


def overlap_depths(text: str) -> list[int]:
    """`--overlap-depths 1,2,3`: the scheduler is restarted with each, against the same worker."""
    depths = [int(d) for d in text.split(",")]
    if not depths or min(depths) < 0:
        raise argparse.ArgumentTypeError(f"a comma-separated list of depths >= 0, got {text!r}")
    return depths


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The flags offline.py and latency.py share: the model, the engine and stack settings, where rows go."""
    ap.add_argument("--model", required=True, help="directory with config.json (weights are random: dummy)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--max-context", type=int, default=4096, help="the workloads need at most 2048")
    ap.add_argument("--overlap-depths", type=overlap_depths, default=[2],
                    help="the stack's scheduler --overlap-depth values to time, e.g. 1,2,3")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    ap.add_argument("--out", default="")


class Stack:
    """`llmrpc worker` and `llmrpc scheduler` as child processes, the worker on a unix socket.

    `restart_scheduler` swaps in a scheduler with another overlap depth; the worker (its
    weights and CUDA graphs) stays, and takes the new scheduler's step stream.
    """

    def __init__(self, args: argparse.Namespace, port: int = 50152, overlap_depth: int = 2) -> None:
        self.args = args
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="llmrpc-bench-")
        self._sock = f"{self.dir}/worker0.sock"
        log = open(f"{args.log_dir}/worker.log", "w")
        self.worker = subprocess.Popen(
            [*_CLI, "worker", "--model", args.model, "--load-format", "dummy", "--device", args.device,
             "--port", str(port + 8), "--unix-socket", self._sock, "--max-running-requests", str(args.max_running),
             "--attention-backend", args.attention_backend, "--cuda-graph-max-bs", str(args.cuda_graph_max_bs),
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.scheduler: subprocess.Popen | None = None
        self.restart_scheduler(overlap_depth)
        self.target = f"127.0.0.1:{port}"

    def restart_scheduler(self, overlap_depth: int) -> None:
        if self.scheduler is not None:
            _stop(self.scheduler)
        self.overlap_depth = overlap_depth
        log = open(f"{self.args.log_dir}/scheduler-depth{overlap_depth}.log", "w")
        self.scheduler = subprocess.Popen(
            [*_CLI, "scheduler", "--workers", f"unix:{self._sock}", "--port", str(self.port),
             "--max-prefill-tokens", str(self.args.max_prefill_tokens), "--overlap-depth", str(overlap_depth),
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        from llmrpc.services.client import check_health

        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in (self.worker, self.scheduler):
                if p.poll() is not None:
                    raise RuntimeError(f"a service exited with {p.returncode}; see {self.args.log_dir}")
            if check_health(self.target, timeout=1.0):
                return
            time.sleep(0.5)
        raise TimeoutError("the stack did not become ready")

    def close(self) -> None:
        for p in (self.scheduler, self.worker):
            _stop(p)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def generate_all(target: str, workload: Workload, prefix: str) -> tuple[int, float]:
    """All requests at once (stream=False); returns (completion tokens, wall seconds)."""
    import grpc

    from llmrpc.v1 import generation_pb2, generation_pb2_grpc

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)

        async def one(i: int) -> int:
            req = generation_pb2.GenerateRequest(
                request_id=f"{prefix}{i}", tokens=generation_pb2.TokenIds(ids=workload.prompts[i]),
                sampling=generation_pb2.SamplingParams(max_tokens=workload.max_tokens[i], temperature=TEMPERATURE,
                                                       ignore_eos=True),
                stream=False)
            n = 0
            async for resp in stub.Generate(req):
                n += len(resp.token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(workload.prompts))))
        return sum(counts), time.perf_counter() - t0


def bench_stack(args: argparse.Namespace, workload: Workload) -> list[dict]:
    depths = [0] if args.disable_overlap else args.overlap_depths
    stack = Stack(args, overlap_depth=depths[0])
    rows = []
    try:
        for depth in depths:
            if depth != stack.overlap_depth:
                stack.restart_scheduler(depth)
            t = time.time()
            stack.wait_ready()
            print(f"stack (overlap depth {depth}) ready in {time.time() - t:.0f}s", flush=True)
            warm = Workload([p[:200] for p in workload.prompts[:64]], [40] * 64)
            asyncio.run(generate_all(stack.target, warm, f"warm{depth}-"))
            produced, wall = asyncio.run(generate_all(stack.target, workload, f"r{depth}-"))
            assert produced == workload.output_tokens, (produced, workload.output_tokens)
            print(f"stack (overlap depth {depth}): {wall:.2f}s", flush=True)
            rows.append(_row(args, "llmrpc-stack", produced / wall, overlap=depth > 0, overlap_depth=depth,
                             wall_s=round(wall, 3)))
        return rows
    finally:
        stack.close()


# ---- (c) transformers continuous batching --------------------------------------------------


def bench_hf(args: argparse.Namespace, workload: Workload) -> list[dict]:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(args.model)
    cfg.eos_token_id = None
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=args.hf_attn).eval()
    model.generation_config.eos_token_id = None
    gc = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=1024,
                          eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gc)
    manager.start()
    try:
        def run(w: Workload, prefix: str, deadline_s: float) -> tuple[int, float, int]:
            t0 = time.perf_counter()
            for i, (p, m) in enumerate(zip(w.prompts, w.max_tokens)):
                manager.add_request(input_ids=p, request_id=f"{prefix}{i}", max_new_tokens=m)
            done, produced = 0, 0
            while done < len(w.prompts) and time.perf_counter() - t0 < deadline_s:
                out = manager.get_result(timeout=1.0)
                if out is not None and out.is_finished():
                    done += 1
                    produced += len(out.generated_tokens)
            return produced, time.perf_counter() - t0, done

        run(Workload([p[:200] for p in workload.prompts[:16]], [20] * 16), "warm", 120)
        produced, wall, done = run(workload, "r", args.hf_deadline_s)
    finally:
        manager.stop(block=False)
    print(f"hf: {produced} tokens from {done} finished requests in {wall:.1f}s", flush=True)
    return [_row(args, "hf-transformers", produced / wall, wall_s=round(wall, 3), finished_requests=done,
                 produced_tokens=produced, transformers=transformers.__version__, attn_implementation=args.hf_attn,
                 complete=done == len(workload.prompts))]


# ---- (d) the roofline -------------------------------------------------------------------------


def bench_roofline(args: argparse.Namespace, workload: Workload) -> list[dict]:
    from llmrpc.bench.roofline import measure_rates, workload_ceiling
    from llmrpc.engine.config import ModelConfig

    bw, mm = measure_rates()
    ceiling = workload_ceiling(ModelConfig.load(args.model), [len(p) for p in workload.prompts], workload.max_tokens,
                               bw, mm)
    print(f"roofline: {ceiling['output_tokens_per_s']:.0f} tok/s (bandwidth {bw / 1e9:.0f} GB/s, "
          f"matmul {mm / 1e12:.0f} TFLOP/s)", flush=True)
    return [_row(args, "roofline", ceiling.pop("output_tokens_per_s"), **{k: v for k, v in ceiling.items()
                                                                          if k != "shape"})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--systems", default="roofline,engine,stack,hf")
    ap.add_argument("--disable-overlap", action="store_true")
    ap.add_argument("--hf-attn", default="paged|sdpa")
    ap.add_argument("--hf-deadline-s", type=float, default=150.0)
    args = ap.parse_args()
    workload = offline_workload()
    rows: list[dict] = []
    benches = {"roofline": bench_roofline, "engine": bench_engine, "stack": bench_stack, "hf": bench_hf}
    for name in args.systems.split(","):
        try:
            rows += benches[name](args, workload)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            rows.append(_row(args, {"engine": "llmrpc-engine", "stack": "llmrpc-stack", "hf": "hf-transformers",
                                    "roofline": "roofline"}[name], 0.0, error=repr(exc)[:500]))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{'system':<18}{'overlap':<9}{'depth':<7}{'tok/s':>10}  wall_s")
    for r in rows:
        print(f"{r['system']:<18}{str(r.get('overlap', '')):<9}{str(r.get('overlap_depth', '')):<7}"
              f"{r['output_tokens_per_s']:>10.0f}  {r.get('wall_s', '')}")


if __name__ == "__main__":
    main()
