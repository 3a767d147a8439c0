"""Offline throughput on the nano-vllm / mini-sglang workload (bench/workload.py): output tokens/s.

Systems, each timed on the same 256 requests (all submitted at once) after a warm-up:
  engine    services/llm.py's LLM: the scheduler core + ModelRunner in this process, no gRPC, driven by
            the scheduler service's own step loop (one step in flight ahead; and none)
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
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llmrpc.bench.record import hardware
from llmrpc.bench.workload import TEMPERATURE, Workload, offline_workload, warmup_workload
from llmrpc.engine.runner import ModelRunner, PendingOutput
from llmrpc.engine.step import Step
from llmrpc.services.llm import LLM
from llmrpc.v1.generation_pb2 import SamplingParams


def _row(args: argparse.Namespace, system: str, tok_s: float, **extra) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "benchmark": "offline", "model": Path(args.model).name, "system": system,
        "output_tokens_per_s": round(tok_s, 1), "tp": 1, "gpu": gpu, "hardware": hardware(gpu=gpu),
        "command": " ".join(["python -m llmrpc.bench.offline", *sys.argv[1:]]),
        "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prefill_graph_max_tokens": args.prefill_graph_max_tokens, "flashinfer_prefill": args.flashinfer_prefill,
        "flashinfer_decode": args.flashinfer_decode, "gemv_max_rows": args.gemv_max_rows,
        "fused_decode_max_rows": args.fused_decode_max_rows, **extra,
    }


# ---- (b) the engine alone --------------------------------------------------------------


def engine_llm(args: argparse.Namespace, kind: type[LLM] = LLM, runner: ModelRunner | None = None,
               **scheduler_options) -> LLM:
    """The engine alone: services/llm.py's LLM (or a `kind` of it) on the bench's engine and scheduler flags,
    random weights; with `runner`, a fresh scheduler core on that loaded runner (its weights and KV pool)."""
    from llmrpc.services.cli import engine_options

    model, options = (args.model, engine_options(args)) if runner is None else (runner, {})
    return kind(model, **options, max_prefill_tokens=args.max_prefill_tokens,
                disable_radix_cache=args.disable_radix_cache, **scheduler_options)


class TimedLLM(LLM):
    """An LLM whose steps carry CUDA events around their GPU work: `timeline` gets (pure decode?, start, end)."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.timeline: list[tuple[bool, torch.cuda.Event, torch.cuda.Event]] = []

    def launch(self, step: Step) -> PendingOutput:
        # runner.launch() in its three phases, the events around the GPU work only: prepare is
        # host work the GPU may wait for. A multi-step decode's events hold its k passes, and the
        # host work between them.
        if step.decode_steps > 1:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pending = self.runner.launch(step)
            end.record()
            self.timeline.append((True, start, end))
            return pending
        batch = self.runner.prepare(step)
        if batch is None:
            return PendingOutput(step.step_id, {}, None)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = self.runner.sample_async(batch, self.runner.forward(batch))
        end.record()
        self.timeline.append((step.num_decode == step.num_rows, start, end))
        return pending


def workload_sampling(workload: Workload) -> list[SamplingParams]:
    """One SamplingParams per request: the workload's temperature and length, EOS ignored."""
    return [SamplingParams(temperature=TEMPERATURE, max_tokens=m, ignore_eos=True) for m in workload.max_tokens]


def bench_engine(args: argparse.Namespace, workload: Workload) -> list[dict]:
    llm = engine_llm(args, overlap_depth=0 if args.disable_overlap else 1)
    warm = warmup_workload(workload)
    llm.generate(warm.prompts, workload_sampling(warm))
    # (overlap, decode passes): every --decode-steps-list value with overlap, then one pass without.
    variants = [(not args.disable_overlap, k) for k in args.decode_steps_list]
    if not args.disable_overlap:
        variants.append((False, 1))
    rows = []
    for overlap, passes in variants:
        # A fresh core on the same runner: an empty prefix cache, so the warm-up's prompts are no hit.
        timed = engine_llm(args, TimedLLM, llm.runner, overlap_depth=int(overlap), decode_steps=passes)
        assert isinstance(timed, TimedLLM)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = timed.generate(workload.prompts, workload_sampling(workload))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        produced = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        assert produced == workload.output_tokens, (produced, workload.output_tokens)
        timeline = timed.timeline
        # GPU idle between consecutive decode steps: end of one step's work to the start of the next.
        gaps, busy = [], 0.0
        for (dec_a, _, end_a), (dec_b, start_b, end_b) in zip(timeline, timeline[1:]):
            if dec_a and dec_b:
                gaps.append(max(end_a.elapsed_time(start_b), 0.0))
        for _, s, e in timeline:
            busy += s.elapsed_time(e)
        result = dict(wall_s=round(wall, 3), steps=len(timeline),
                      decode_gap_us_mean=round(1e3 * float(np.mean(gaps)), 1) if gaps else None,
                      decode_gap_us_p50=round(1e3 * float(np.median(gaps)), 1) if gaps else None,
                      gpu_idle_fraction=round(1 - busy / 1e3 / wall, 4))
        print(f"engine overlap={overlap} decode_steps={passes}: {workload.output_tokens / wall:.0f} tok/s {result}",
              flush=True)
        rows.append(_row(args, "llmrpc-engine", workload.output_tokens / wall, overlap=overlap,
                         decode_steps=passes, **result))
    del llm, timed
    torch.cuda.empty_cache()
    return rows


# ---- (a) the full stack -----------------------------------------------------------------


def int_list(low: int):
    """`1,2,3` as a list of ints, each >= low (`--overlap-depths`, `--decode-steps-list`)."""
    from llmrpc.services.cli import int_at_least

    one = int_at_least(low)

    def parse(text: str) -> list[int]:
        try:
            return [one(d) for d in text.split(",")]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"a comma-separated list of integers >= {low}, got {text!r}") from None
    return parse


def scheduler_variants(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The stack's (overlap depth, decode passes) pairs to time, the scheduler restarted for each."""
    depths = [0] if args.disable_overlap else args.overlap_depths
    return [(depth, k) for depth in depths for k in args.decode_steps_list]


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The flags the benches share: the model, `llmrpc`'s own engine and scheduler flags (services/cli.py's
    groups, here on a GPU with random weights), the stack's overlap depths, where rows go."""
    from llmrpc.services.cli import add_engine_flags, add_scheduler_flags

    ap.add_argument("--model", required=True, help="directory with config.json (weights are random: dummy)")
    add_engine_flags(ap)
    add_scheduler_flags(ap)
    ap.set_defaults(device="cuda", load_format="dummy", max_context=4096)  # the workloads need at most 2048
    ap.add_argument("--overlap-depths", type=int_list(0), default=[2],
                    help="the stack's scheduler --overlap-depth values to time, e.g. 1,2,3")
    ap.add_argument("--decode-steps-list", type=int_list(1), default=[1],
                    help="the --decode-steps values to time (multi-step decode), e.g. 1,4,8")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    ap.add_argument("--out", default="")


class Stack:
    """`llmrpc worker` and `llmrpc scheduler` on this run's engine and scheduler flags, started by the
    launcher (services/launcher.py) on free ports, the worker on a unix socket; `target` takes tokens.
    With `tokenizer` (a directory of tokenizer files, or a .gguf) an `llmrpc tokenizer` front runs too,
    and `text_target` takes text; with `trace`, every child prints services/trace.py's points.

    `use` swaps in a scheduler with another overlap depth or decode passes; the
    worker (its weights and CUDA graphs) stays, and takes the new scheduler's step stream.
    """

    def __init__(self, args: argparse.Namespace, overlap_depth: int = 2, decode_steps: int = 1,
                 tokenizer: str | None = None, trace: bool = False) -> None:
        from llmrpc.services.cli import stack_config
        from llmrpc.services.launcher import Launcher, start_on_fresh_ports
        from llmrpc.services.rpc import free_port
        from llmrpc.services.tokenizer.server import TokenizerConfig

        self._sockets = tempfile.TemporaryDirectory(prefix="llmrpc-bench-")

        def start() -> Launcher:
            scheduler_port = free_port()
            front = (TokenizerConfig(model_path=tokenizer, port=free_port(), scheduler=f"127.0.0.1:{scheduler_port}")
                     if tokenizer else None)
            config = stack_config(args, args.model, self._sockets.name, scheduler_port=scheduler_port,
                                  worker_port=free_port(), tokenizer=front, log_level="warning", trace=trace)
            config = config.with_scheduler(replace(config.scheduler, overlap_depth=overlap_depth,
                                                   decode_steps=decode_steps))
            return Launcher(config, log_dir=Path(args.log_dir)).start()

        self.launcher = start_on_fresh_ports(start)

    @property
    def variant(self) -> tuple[int, int]:
        """(overlap depth, decode passes) of the scheduler running now."""
        s = self.launcher.config.scheduler
        return s.overlap_depth, s.decode_steps

    @property
    def target(self) -> str:
        return self.launcher.child("scheduler").target

    @property
    def text_target(self) -> str:
        return self.launcher.child("tokenizer").target

    @property
    def worker_target(self) -> str:
        return self.launcher.child("worker rank 0").target

    @property
    def num_pages(self) -> int:
        """The worker's KV pool, in pages (from the scheduler's ModelInfo)."""
        import grpc

        from llmrpc.v1 import generation_pb2, generation_pb2_grpc

        with grpc.insecure_channel(self.target) as ch:
            return generation_pb2_grpc.GenerationStub(ch).GetModelInfo(generation_pb2.GetModelInfoRequest()).kv_pages_total

    def use(self, variant: tuple[int, int]) -> None:
        """Restarts the scheduler with (overlap depth, decode passes), unless it runs with them already."""
        if variant != self.variant:
            depth, passes = variant
            self.launcher.replace_scheduler(replace(self.launcher.config.scheduler, overlap_depth=depth,
                                                    decode_steps=passes))

    def close(self) -> None:
        self.launcher.stop()
        self._sockets.cleanup()


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
    variants = scheduler_variants(args)
    t = time.time()
    stack = Stack(args, *variants[0])
    rows = []
    try:
        for depth, passes in variants:
            t = time.time()
            stack.use((depth, passes))
            name = f"stack (overlap depth {depth}, {passes} decode steps)"
            print(f"{name} ready in {time.time() - t:.0f}s", flush=True)
            warm = warmup_workload(workload)
            asyncio.run(generate_all(stack.target, warm, f"warm{depth}.{passes}-"))
            produced, wall = asyncio.run(generate_all(stack.target, workload, f"r{depth}.{passes}-"))
            assert produced == workload.output_tokens, (produced, workload.output_tokens)
            print(f"{name}: {wall:.2f}s", flush=True)
            rows.append(_row(args, "llmrpc-stack", produced / wall, overlap=depth > 0, overlap_depth=depth,
                             decode_steps=passes, wall_s=round(wall, 3)))
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

        run(warmup_workload(workload, 16, max_tokens=20), "warm", 120)
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
    add_engine_args(ap)  # --disable-overlap among them: the engine and the stack one step at a time
    ap.add_argument("--systems", default="roofline,engine,stack,hf")
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
    print(f"\n{'system':<18}{'overlap':<9}{'depth':<7}{'k':<4}{'tok/s':>10}  wall_s")
    for r in rows:
        print(f"{r['system']:<18}{str(r.get('overlap', '')):<9}{str(r.get('overlap_depth', '')):<7}"
              f"{str(r.get('decode_steps', '')):<4}{r['output_tokens_per_s']:>10.0f}  {r.get('wall_s', '')}")


if __name__ == "__main__":
    main()
