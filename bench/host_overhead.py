"""What each operation of an eager forward costs the host: microseconds per call, at 1 and 2,048 tokens.

A prefill is not graphed, so when launching its kernels takes the host longer than the GPU takes to
run them (bench/profile_prefill.py: forward host time equal to its GPU time), the first token waits
on Python. This times, on the engine's own loaded model and a planned prefill batch, the host side of
each operation the forward makes (N calls in a row, then one synchronize outside the timing), next
to the GPU time of the same calls, and the whole decoder layer and model forward the same way.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, cast

import numpy as np
import torch
import torch.nn.functional as F

from llmrpc.bench.offline import add_engine_args, engine_llm
from llmrpc.engine.step import Sampling, SlotParams, Step
from llmrpc.kernels import fused

if TYPE_CHECKING:
    from llmrpc.engine.models.llama import LlamaDecoderLayer, LlamaMLP
    from llmrpc.kernels.flashinfer_backend import FlashInferAttentionBackend


def timed(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host µs per call, GPU µs per call) over `calls` calls in a row."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    runner = engine_llm(args).runner
    model, attn = runner.model, cast("FlashInferAttentionBackend", runner.attention)
    layer = cast("LlamaDecoderLayer", model.model.layers[0])
    sa, mlp = layer.self_attn, cast("LlamaMLP", layer.mlp)
    rows = []
    with torch.inference_mode():
        for tokens in (1, 2048):
            pages = -(-tokens // runner.config.page_size)
            step = Step(0, slots=np.array([0], np.int32), starts=np.array([0], np.int32),
                        chunk_lens=np.array([tokens], np.int32),
                        chunk_tokens=np.random.default_rng(0).integers(0, 10000, tokens).astype(np.int32),
                        sample_chunks=np.array([True]), page_counts=np.array([pages], np.int32),
                        page_ids=np.arange(pages, dtype=np.int32), admissions=[SlotParams.of(Sampling(), 0)])
            batch = runner.prepare(step)
            assert batch is not None and attn._out_loc is not None  # planned: K/V go to the prompt's pages
            out_loc = attn._out_loc
            x = model.model.embed_tokens(batch.input_ids)
            rope = model.model.rotary.for_positions(batch.positions, x.dtype)
            qkv = sa.qkv_proj(x)
            q, k, v = qkv.split([sa.qkv_proj.q_size, sa.qkv_proj.kv_size, sa.qkv_proj.kv_size], -1)
            q = q.view(-1, sa.num_heads, sa.head_dim)
            k = k.view(-1, sa.num_kv_heads, sa.head_dim)
            v = v.view(-1, sa.num_kv_heads, sa.head_dim)
            residual = x.clone()
            gate_up = mlp.gate_up_proj(x)
            w = sa.qkv_proj.weight
            identity = torch.nn.Identity()
            ops: dict[str, Callable[[], object]] = {
                "F.linear qkv": lambda: F.linear(x, w),
                "QKVParallelLinear (module)": lambda: sa.qkv_proj(x),
                "torch.mm qkv": lambda: torch.mm(x, w.t()),
                "rms_norm (flashinfer)": lambda: fused.rms_norm(x, layer.input_layernorm.weight, 1e-6),
                "add_rms_norm (flashinfer)": lambda: fused.add_rms_norm(x, residual, layer.input_layernorm.weight,
                                                                        1e-6),
                "silu_and_mul (flashinfer)": lambda: fused.silu_and_mul(gate_up),
                "qk_norm_rope (triton)": lambda: rope(q, k, sa.q_norm, sa.k_norm),
                "store_kv (triton)": lambda: fused.store_kv(runner.kv_pool.k[0], runner.kv_pool.v[0],
                                                            out_loc, k, v),
                "attention forward (store + run)": lambda: attn.forward(q, k, v, 0),
                "attention run (flashinfer)": lambda: attn._active.run(q, (runner.kv_pool.k[0], runner.kv_pool.v[0])),
                "decoder layer": lambda: layer(x, residual, rope, attn),
                "model forward": lambda: model(batch.input_ids, batch.positions, attn),
                "empty nn.Module call": lambda: identity(x),
                "prepare (batch + plan)": lambda: runner.prepare(step),
            }
            for name, fn in ops.items():
                host, gpu = timed(fn, 1 if name.startswith("prepare") else args.calls)
                rows.append({"tokens": tokens, "op": name, "host_us": round(host, 1), "gpu_us": round(gpu, 1)})
                print(f"{tokens:>5} {name:<34}{host:>9.1f} us host {gpu:>9.1f} us gpu", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
