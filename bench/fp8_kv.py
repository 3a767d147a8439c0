"""FP8 KV cache (--kv-cache-dtype fp8_e4m3) against the model dtype's: pool size, offline throughput, greedy agreement.

For each KV dtype (auto = the model's, then fp8_e4m3) one engine (bench/offline.py `engine_llm`: the
bench's engine flags, random weights of --model's shape, the pool sized from free memory) reports
  pool       its KV pages and tokens (fp8 should hold twice bf16's in the same memory),
  offline    output tokens/s on bench/workload.py's offline workload (bench/offline.py's; after its
             warm-up), through services/llm.py's LLM with one step in flight,
  greedy     --prompts random prompts (prefilled in two chunks, then decoded through the CUDA graphs,
             bench/gpu_check.py's Driver) for --new-tokens tokens: fp8 against the model dtype's tokens,
             free-running (fraction of identical positions and each prompt's first divergence; one
             flip changes the rest of a sequence) and teacher-forced (fed the model dtype's tokens, so
             every position is an independent comparison).
On CUDA two kernel checks come first: the Triton K/V store writes the torch store's float8 bytes
(the GPU's rounding, which the CPU tests cannot check), and FlashInfer's FP8 paged attention matches
the torch backend over the same float8 pages (bench/gpu_check.py `attention_case`).

--tiny runs it all on the CPU on a 2-layer model of --model's family in seconds (a smoke run, not a
figure). Writes one JSON document to --out (command, commit, hardware, date first).

    python3 -m llmrpc.bench.fp8_kv --model bench/configs/qwen3-0.6b --out fp8-kv-qwen3-0.6b.json
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrpc.bench.gpu_check import Driver, attention_case, rel_err
from llmrpc.bench.offline import add_engine_args, engine_llm, workload_sampling
from llmrpc.bench.record import provenance, write_json
from llmrpc.bench.workload import offline_workload, warmup_workload
from llmrpc.kernels import fused, triton_fused

KV_DTYPES = ("auto", "fp8_e4m3")
FP8 = torch.float8_e4m3fn
# --tiny: the model's config.json shrunk to this (vocabulary kept above the workload's token ids).
TINY_SHAPE = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=10240, tie_word_embeddings=True)


def tiny_model(model: str, folder: Path) -> str:
    config = json.loads((Path(model) / "config.json").read_text())
    config.update(TINY_SHAPE)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


# ---- kernel checks (CUDA) ------------------------------------------------------------------


def check_store() -> dict:
    """The Triton store against the torch store (clamp, cast, index_copy_) on bf16 K/V, outliers included:
    the same float8 bytes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, kv_heads, dim, slots = 777, 8, 128, 4096
    qkv = torch.randn(tokens, 4 * kv_heads * dim, generator=g, device="cuda").mul_(40).to(torch.bfloat16)
    k = qkv[:, : kv_heads * dim].view(tokens, kv_heads, dim)  # strided views, as the model passes them
    v = qkv[:, kv_heads * dim: 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    loc = torch.randperm(slots, generator=g, device="cuda")[:tokens]
    caches = [torch.zeros(slots // 16, 16, kv_heads, dim, dtype=torch.uint8, device="cuda").view(FP8) for _ in range(4)]
    triton_fused.store_kv(caches[0], caches[1], loc, k, v)
    fused.store_kv_torch(caches[2], caches[3], loc, k, v)
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches[:2], caches[2:]))
    stored = caches[0].view(-1, kv_heads, dim).view(torch.uint8)[loc].view(FP8).float()
    finite = bool(torch.isfinite(stored).all())
    saturated = float((k.float().abs() > 448).float().mean())
    return {"triton_equals_torch": same, "finite": finite, "fraction_beyond_448": round(saturated, 4),
            "max_round_trip_rel_err": rel_err(stored, k.float().clamp(-448, 448)), "pass": same and finite}


def check_attention() -> dict:
    """FlashInfer over float8 pages against the torch backend over the same pages (max rel err)."""
    cases = {
        "prefill": ([(0, 37), (0, 200), (0, 1)], 0),
        "chunked_prefill_over_prefix": ([(64, 100), (300, 17), (5, 1)], 0),
        "decode": ([(p, 1) for p in (0, 1, 15, 16, 17, 500, 2047)], 7),
        "mixed": ([(10, 1), (700, 1), (0, 120), (250, 64)], 2),
    }
    errors: dict[str, float] = {}
    for page_size in (1, 16):
        for name, (rows, num_decode) in cases.items():
            errors[f"{name}/page{page_size}"] = attention_case(page_size, rows, num_decode, seed=len(errors),
                                                               kv_dtype=FP8)
    worst = max(errors.values())
    return {"rel_err": errors, "worst": worst, "pass": worst < 1e-2}


# ---- one engine per KV dtype -----------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def greedy(runner: Any, prompts: list[list[int]], new_tokens: int, forced: np.ndarray | None = None) -> np.ndarray:
    """[prompts, new_tokens] greedy tokens; with `forced`, each decode step is fed forced's previous token."""
    driver = Driver(runner, prompts, chunk=64)
    seq = [driver.prefill()]
    for i in range(new_tokens - 1):
        seq.append(driver.decode_step(forced=None if forced is None else forced[:, i])[1])
    return np.stack(seq, 1)


def run_dtype(args: argparse.Namespace, kv: str, prompts: list[list[int]], reference: np.ndarray | None) -> dict:
    args.kv_cache_dtype = kv
    free_gib = torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else None
    t = time.time()
    llm = engine_llm(args, overlap_depth=1)
    runner = llm.runner
    info = runner.info
    per_token = runner.kv_pool.k[0][0, 0].nbytes * 2 * len(runner.kv_pool.k)
    out: dict[str, Any] = {"kv_cache_dtype": info.kv_cache_dtype, "startup_s": round(time.time() - t, 1),
                           "cuda_graphs": runner.graphs is not None}
    out["pool"] = {"num_pages": info.num_pages, "page_size": info.page_size,
                   "tokens": info.num_pages * info.page_size, "bytes_per_token": per_token,
                   "gib": round(info.num_pages * info.page_size * per_token / 2**30, 2),
                   "tokens_per_gib": round(2**30 / per_token),
                   "gpu_free_gib_before_start": None if free_gib is None else round(free_gib, 2)}
    print(f"{kv}: {out['pool']} ({out['startup_s']} s to start)", flush=True)
    workload = offline_workload(args.requests)
    warm = warmup_workload(workload, num_requests=min(64, args.requests))
    llm.generate(warm.prompts, workload_sampling(warm))
    _sync()
    t = time.perf_counter()
    outputs = llm.generate(workload.prompts, workload_sampling(workload))
    _sync()
    wall = time.perf_counter() - t
    produced = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert produced == workload.output_tokens, (produced, workload.output_tokens)
    out["offline"] = {"requests": args.requests, "output_tokens": produced, "wall_s": round(wall, 3),
                      "output_tokens_per_s": round(produced / wall, 1)}
    print(f"{kv}: offline {out['offline']}", flush=True)
    # The LLM is done with the runner: the driver takes slots and pages of its own.
    tokens = greedy(runner, prompts, args.new_tokens)
    out["greedy_tokens"] = tokens
    if reference is not None:
        forced = greedy(runner, prompts, args.new_tokens, forced=reference)
        out["greedy_vs_auto"] = agreement(reference, tokens, forced)
        print(f"{kv}: greedy vs auto {json.dumps(out['greedy_vs_auto'])[:300]}", flush=True)
    del llm, runner, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def agreement(reference: np.ndarray, free: np.ndarray, forced: np.ndarray) -> dict:
    same = reference == free
    first = [int(np.argmin(row)) if not row.all() else None for row in same]  # None: never diverged
    return {
        "free_running": {"match_rate": round(float(same.mean()), 4), "prompts_identical": int(same.all(1).sum()),
                         "first_divergence": first},
        "teacher_forced": {"match_rate": round(float((reference == forced).mean()), 4)},
        "positions": int(reference.size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--requests", type=int, default=256, help="offline workload requests (256: the standard one)")
    ap.add_argument("--prompts", type=int, default=32, help="greedy agreement prompts")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of --model's family on the CPU, small counts")
    args = ap.parse_args()
    t0 = time.time()
    report: dict[str, Any] = {**provenance("llmrpc.bench.fp8_kv"), "benchmark": "fp8_kv",
                              "model": Path(args.model).name}
    tmp = tempfile.TemporaryDirectory(prefix="llmrpc-fp8-")
    if args.tiny:
        args.model = tiny_model(args.model, Path(tmp.name))
        args.device, args.max_context = "cpu", 2048
        args.requests, args.prompts, args.new_tokens = min(args.requests, 4), min(args.prompts, 4), 16
        report["model"] += " (--tiny: " + ", ".join(f"{k}={v}" for k, v in TINY_SHAPE.items()) + ")"
    cuda = args.device.startswith("cuda")
    report["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    report["torch"] = torch.__version__
    if cuda:
        import flashinfer

        report["flashinfer"] = flashinfer.__version__
        for name, check in (("store_check", check_store), ("attention_check", check_attention)):
            t = time.time()
            report[name] = {**check(), "seconds": round(time.time() - t, 1)}
            print(name, json.dumps({k: v for k, v in report[name].items() if k != "rel_err"}), flush=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 10000, int(rng.integers(20, 300))).tolist() for _ in range(args.prompts)]
    runs: dict[str, dict] = {}
    for kv in KV_DTYPES:
        reference = runs["auto"]["greedy_tokens"] if runs else None
        runs[kv] = run_dtype(args, kv, prompts, reference)
    for run in runs.values():
        run.pop("greedy_tokens")
    auto, fp8 = runs["auto"], runs["fp8_e4m3"]
    report["runs"] = runs
    report["summary"] = {
        "pool_token_ratio": round(fp8["pool"]["tokens"] / auto["pool"]["tokens"], 3),
        "tokens_per_gib_ratio": round(fp8["pool"]["tokens_per_gib"] / auto["pool"]["tokens_per_gib"], 3),
        "offline_speedup": round(fp8["offline"]["output_tokens_per_s"] / auto["offline"]["output_tokens_per_s"], 3),
        "greedy_free_running_match": fp8["greedy_vs_auto"]["free_running"]["match_rate"],
        "greedy_teacher_forced_match": fp8["greedy_vs_auto"]["teacher_forced"]["match_rate"],
    }
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report["summary"]), flush=True)
    if args.out:
        write_json(Path(args.out), report)
    tmp.cleanup()


if __name__ == "__main__":
    main()
