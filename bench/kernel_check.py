"""The fused kernels on the GPU: checked against their torch references, timed against what they replace.

Checks, each on fresh random bf16 CUDA inputs over several token counts:
  qk_norm_rope  Qwen3's per-head Q/K RMSNorm + RoPE, in place on views into a fused QKV output:
                Triton and FlashInfer paths against the torch reference (the same rounding points,
                computed on the GPU) and against a float64 one; the V part of each row must stay
                untouched, nothing NaN
  rope          RoPE alone (Llama, Qwen2, Mistral): Triton and FlashInfer (strided) paths, the same way
  store_kv      K and V into the paged cache in one launch vs index_copy_: into a NaN-poisoned cache,
                bit-exact at the token slots, every other slot still NaN
  race          the Triton race sampler against its torch reference: the same tokens
  filtered      FlashInfer's filtered sampling (unseeded top-k / top-p / min-p rows) against
                engine/sampling.py's distribution: total variation of 2^18 draws, and mass drawn
                outside the kept tokens; the sort path's own draws give the noise floor
Timings (triton.testing.do_bench medians): each attention-block op as a CUDA graph of 28 calls on 28
input sets, one per layer as in a captured decode step, per call; and the eager wall time per call
(host launch cost included); at the Qwen3-0.6B and Qwen3-8B attention shapes. Sampling ops eager.
Prints a table; writes every number to --out (JSON).

--gemv checks and times the few-row linears instead (kernels/triton_gemv.py): each of a decoder layer's
four (QKV after add + RMSNorm, O, gate_up after add + RMSNorm, down after SiLU-and-mul) at 1, 2 and 4 rows,
the GEMV against the torch path it replaces (cuBLAS and the norm or SiLU kernel before it), output and new
residual compared; device time per layer in graphs over distinct weights (no L2 reuse), and a sweep of tiles
at one row.

--decode checks and times the fused decode attention (kernels/triton_decode.py: Q/K norm, RoPE, K/V store,
split-KV attention and merge in one launch) against what it replaces (the Triton Q/K norm + RoPE and K/V store,
then FlashInfer's decode on tensor cores) at Qwen3-0.6B's and -8B's heads, 1-8 rows, 128-8,192 tokens of
context: the outputs and the stored K/V compared; device time per layer in graphs over distinct caches, and a
sweep of split counts at one row. --decode --decode-batch does the same at an offline run's batches: 32-256 rows
whose contexts are spread around 512 and 1,024 tokens, with each path's K/V read rate.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from llmrpc.bench.gpu_check import rel_err, run_checks
from llmrpc.bench.record import provenance, write_json
from llmrpc.engine.config import ModelConfig
from llmrpc.engine.layers.rotary import RotaryEmbedding
from llmrpc.engine.sampling import filter_sorted, filtered_probs
from llmrpc.kernels import fused, triton_decode, triton_fused, triton_gemv
from llmrpc.kernels.sampling import filtered_sample_flashinfer, race_sample_torch, race_sample_triton

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("qwen3-0.6b", "qwen3-8b")
CHECK_TOKENS = (1, 7, 300, 2048)
TIME_TOKENS = (1, 64, 256, 2048, 8192)
LAYERS = 28  # input sets per timing graph: one per layer of Qwen3-0.6B
PAGE = 16
EPS = 1e-6
MAX_POS = 40960

Variant = Callable[["Inputs"], tuple[torch.Tensor, torch.Tensor]]
Store = Callable[["Inputs"], None]


# ---- inputs ---------------------------------------------------------------------------------


class Inputs:
    """One layer's worth: a fused QKV output and its q/k/v views, positions, norm weights, K/V caches."""

    def __init__(self, heads: int, kv_heads: int, dim: int, tokens: int, g: torch.Generator,
                 cos_sin: torch.Tensor) -> None:
        self.qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g, device="cuda").to(torch.bfloat16)
        q, k, v = self.qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        self.q, self.k, self.v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
        self.positions = torch.randint(0, MAX_POS, (tokens,), generator=g, device="cuda")
        self.cos_sin = cos_sin
        self.q_weight = (torch.rand(dim, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
        self.k_weight = (torch.rand(dim, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
        # One sequence of `tokens` from position 0 over pages in random order, as a prefill chunk lands.
        pages = -(-tokens // PAGE)
        self.pages = torch.randperm(2 * pages + 8, generator=g, device="cuda")[:pages].to(torch.int32)
        t = torch.arange(tokens, device="cuda")
        self.loc = self.pages.long()[t // PAGE] * PAGE + t % PAGE
        self.k_cache = torch.full((2 * pages + 8, PAGE, kv_heads, dim), float("nan"), dtype=torch.bfloat16,
                                  device="cuda")
        self.v_cache = self.k_cache.clone()
        self.fi_meta: tuple[torch.Tensor, ...] | None = None  # FlashInfer append's metadata, built once


def float64_norm_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                      weight: torch.Tensor | None) -> torch.Tensor:
    x = x.double()
    if weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    cos, sin = fused.rope_cos_sin(cos_sin.double(), positions, torch.float64)
    return fused.rope_torch(x, cos, sin)


# ---- the variants -------------------------------------------------------------------------------


def norm_rope_variants() -> dict[str, Variant]:
    def before(i: Inputs):  # what the model ran: two 2-D norms over reshaped copies, then RoPE
        q, k = fused.rms_norm(i.q, i.q_weight, EPS), fused.rms_norm(i.k, i.k_weight, EPS)
        fused.qk_norm_rope_(q, k, i.positions, i.cos_sin, kernel="flashinfer")
        return q, k

    def flashinfer_3d(i: Inputs):
        fused.qk_norm_rope_(i.q, i.k, i.positions, i.cos_sin, i.q_weight, i.k_weight, EPS, kernel="flashinfer")
        return i.q, i.k

    def triton(block_t: int):
        def run(i: Inputs):
            triton_fused.qk_norm_rope(i.q, i.k, i.positions, i.cos_sin, i.q_weight, i.k_weight, EPS, block_t)
            return i.q, i.k
        return run

    return {"before (copies, 2 norms, rope)": before, "flashinfer 3-D norms + rope": flashinfer_3d,
            "triton": triton(triton_fused.NORM_ROPE_BLOCK_T), "triton block_t=4": triton(4),
            "triton block_t=32": triton(32)}


def rope_variants() -> dict[str, Variant]:
    def before(i: Inputs):  # what the model ran: contiguous copies, then FlashInfer
        q, k = i.q.contiguous(), i.k.contiguous()
        fused.qk_norm_rope_(q, k, i.positions, i.cos_sin, kernel="flashinfer")
        return q, k

    def kernel(name: str):
        def run(i: Inputs):
            fused.qk_norm_rope_(i.q, i.k, i.positions, i.cos_sin, kernel=name)
            return i.q, i.k
        return run

    return {"before (copies + flashinfer)": before, "flashinfer strided": kernel("flashinfer"),
            "triton": kernel("triton")}


def store_variants(with_fi_append: bool) -> dict[str, Store]:
    variants: dict[str, Store] = {
        "before (index_copy_ x2)": lambda i: fused.store_kv(i.k_cache, i.v_cache, i.loc, i.k, i.v, kernel="torch"),
        "triton": lambda i: fused.store_kv(i.k_cache, i.v_cache, i.loc, i.k, i.v, kernel="triton"),
        "triton block_t=1": lambda i: triton_fused.store_kv(i.k_cache, i.v_cache, i.loc, i.k, i.v, block_t=1),
        "triton block_t=16": lambda i: triton_fused.store_kv(i.k_cache, i.v_cache, i.loc, i.k, i.v, block_t=16),
    }
    if with_fi_append:
        import flashinfer

        def fi_append(i: Inputs) -> None:
            # The kernel alone; its per-step metadata (batch indices, positions, indptr) is built outside.
            if i.fi_meta is None:
                t = i.loc.shape[0]
                i.fi_meta = (torch.zeros(t, dtype=torch.int32, device="cuda"),
                             torch.arange(t, dtype=torch.int32, device="cuda"), i.pages,
                             torch.tensor([0, len(i.pages)], dtype=torch.int32, device="cuda"),
                             torch.tensor([t - (len(i.pages) - 1) * PAGE], dtype=torch.int32, device="cuda"))
            b, p, idx, indptr, last = i.fi_meta
            flashinfer.append_paged_kv_cache(i.k, i.v, b, p, (i.k_cache, i.v_cache), idx, indptr, last)

        variants["flashinfer append_paged_kv_cache"] = fi_append
    return variants


# ---- checks -----------------------------------------------------------------------------------


def fresh_cases(variants: dict, shapes: dict[str, tuple[int, int, int]], cos_sin: torch.Tensor,
                g: torch.Generator):
    """(case name, variant, fresh inputs) for every model shape, checked token count and variant."""
    for model, (heads, kv_heads, dim) in shapes.items():
        for tokens in CHECK_TOKENS:
            for name, run in variants.items():
                yield f"{model}/T={tokens}/{name}", run, Inputs(heads, kv_heads, dim, tokens, g, cos_sin)


def check_in_place(variants: dict[str, Variant], norm: bool, shapes: dict[str, tuple[int, int, int]],
                   cos_sin: torch.Tensor, g: torch.Generator) -> dict:
    """Each variant on fresh inputs per (model, T): error vs the torch reference and vs float64."""
    results: dict[str, dict] = {}
    for case, run, i in fresh_cases(variants, shapes, cos_sin, g):
        weights = (i.q_weight, i.k_weight) if norm else (None, None)
        want_q, want_k = fused.qk_norm_rope_torch(i.q.clone(), i.k.clone(), i.positions, cos_sin, *weights, EPS)
        exact_q = float64_norm_rope(i.q, i.positions, cos_sin, weights[0])
        exact_k = float64_norm_rope(i.k, i.positions, cos_sin, weights[1])
        v_before = i.v.clone()
        q, k = run(i)
        torch.cuda.synchronize()
        r: dict = {"vs_reference": max(rel_err(q, want_q), rel_err(k, want_k)),
                   "vs_float64": max(rel_err(q, exact_q), rel_err(k, exact_k)),
                   "finite": bool(torch.isfinite(q).all() and torch.isfinite(k).all()),
                   "v_untouched": bool(torch.equal(i.v, v_before))}
        r["pass"] = r["vs_reference"] < 1e-2 and r["vs_float64"] < 1e-2 and r["finite"] and r["v_untouched"]
        results[case] = r
    return {"pass": all(r["pass"] for r in results.values()),
            "worst_vs_reference": max(r["vs_reference"] for r in results.values()),
            "worst_vs_float64": max(r["vs_float64"] for r in results.values()), "cases": results}


def check_store(variants: dict[str, Store], shapes: dict[str, tuple[int, int, int]],
                cos_sin: torch.Tensor, g: torch.Generator) -> dict:
    """Into NaN-poisoned caches: the token slots hold exactly K and V, every other slot is still NaN."""
    results: dict[str, dict] = {}
    for case, run, i in fresh_cases(variants, shapes, cos_sin, g):
        run(i)
        torch.cuda.synchronize()
        k_flat, v_flat = (c.view(-1, *i.k.shape[1:]) for c in (i.k_cache, i.v_cache))
        written = torch.zeros(k_flat.shape[0], dtype=torch.bool, device="cuda")
        written[i.loc] = True
        r: dict = {"exact": bool(torch.equal(k_flat[i.loc], i.k) and torch.equal(v_flat[i.loc], i.v)),
                   "others_untouched": bool(k_flat[~written].isnan().all() and v_flat[~written].isnan().all())}
        r["pass"] = r["exact"] and r["others_untouched"]
        results[case] = r
    return {"pass": all(r["pass"] for r in results.values()), "cases": results}


def check_race(g: torch.Generator) -> dict:
    logits = (torch.randn(64, 151936, generator=g, device="cuda") * 3).to(torch.bfloat16)
    inv_t = torch.rand(64, generator=g, device="cuda") + 0.5
    keys = torch.randint(0, 2**62, (64,), generator=g, device="cuda")
    same = float((race_sample_triton(logits, inv_t, keys) == race_sample_torch(logits, inv_t, keys)).float().mean())
    return {"same_tokens": same, "pass": same >= 63 / 64}  # a float near-tie may flip one row


FILTERS = {"top_k=20, T=0.7": (0.7, 20, 1.0, 0.0), "top_p=0.9": (1.0, -1, 0.9, 0.0),
           "min_p=0.05": (1.0, -1, 1.0, 0.05), "top_k=50 top_p=0.9 min_p=0.02, T=0.8": (0.8, 50, 0.9, 0.02)}


def _sort_draw(logits: torch.Tensor, t: torch.Tensor, k: torch.Tensor, p: torch.Tensor, m: torch.Tensor,
               uniform: torch.Tensor) -> torch.Tensor:
    """The sampler's sort path (engine/sampling.py Sampler._sort_draw) with given uniforms."""
    probs, ids = filter_sorted(logits.float(), t, k, p, m)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)
    return ids.gather(1, pick).squeeze(1)


def check_filtered(fi, g: torch.Generator, vocab: int = 4096, draws: int = 1 << 18, batch: int = 1 << 14) -> dict:
    """Empirical distributions of FlashInfer's draws and of the sort path's against filtered_probs."""
    results: dict[str, dict] = {}
    ok = True
    for rounding in ("float32", "bfloat16"):  # bf16 logits tie often: the top-k boundary may differ there
        for name, (temp, top_k, top_p, min_p) in FILTERS.items():
            row = torch.randn(vocab, generator=g, device="cuda") * 2.5
            if rounding == "bfloat16":
                row = row.to(torch.bfloat16).float()
            logits = row.expand(batch, vocab).contiguous()
            t, k, p, m = (torch.full((batch,), x, device="cuda") for x in (temp, top_k, top_p, min_p))
            k = k.long()
            want = filtered_probs(row[None], t[:1], k[:1], p[:1], m[:1])[0].double()
            counts = {"flashinfer": torch.zeros(vocab, dtype=torch.float64, device="cuda"),
                      "sort": torch.zeros(vocab, dtype=torch.float64, device="cuda")}
            gen = torch.Generator(device="cuda").manual_seed(len(results))
            for _ in range(draws // batch):
                drawn = filtered_sample_flashinfer(fi, logits, t, k, p, m if min_p > 0 else None, gen)
                counts["flashinfer"] += torch.bincount(drawn, minlength=vocab).double()
                uniform = torch.rand(batch, generator=g, device="cuda")
                counts["sort"] += torch.bincount(_sort_draw(logits, t, k, p, m, uniform), minlength=vocab).double()
            r: dict = {"kept_tokens": int((want > 0).sum())}
            for path, c in counts.items():
                r[f"{path}_tv"] = float(0.5 * (c / draws - want).abs().sum())
                r[f"{path}_outside"] = float(c[want == 0].sum() / draws)
            # Ties at a boundary (bf16) may move a token in or out: allow 1% of the mass there.
            outside_bound = 0.0 if rounding == "float32" else 0.01
            r["pass"] = r["flashinfer_tv"] < max(0.03, 2 * r["sort_tv"]) and r["flashinfer_outside"] <= outside_bound
            ok &= r["pass"]
            results[f"{rounding}/{name}"] = r
    return {"pass": ok, "draws": draws, "vocab": vocab, "cases": results}


# ---- timing -------------------------------------------------------------------------------------


def graph_us(calls: Sequence[Callable[[], object]]) -> float:
    """Device time per call: one CUDA graph of every call (one per layer's inputs), replayed."""
    import triton

    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph
    return 1e3 * ms / len(calls)


def eager_us(calls: Sequence[Callable[[], object]], repeats: int = 4) -> float:
    """Wall time per eager call, host launch cost included (what an eager prefill pays)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / (repeats * len(calls))


def time_ops(shapes: dict[str, tuple[int, int, int]], cos_sin: torch.Tensor, g: torch.Generator,
             with_fi_append: bool) -> list[dict]:
    ops: dict[str, dict[str, Variant] | dict[str, Store]] = {
        "qk_norm_rope": norm_rope_variants(), "rope": rope_variants(), "store_kv": store_variants(with_fi_append)}
    rows = []
    for model, (heads, kv_heads, dim) in shapes.items():
        for tokens in TIME_TOKENS:
            sets = [Inputs(heads, kv_heads, dim, tokens, g, cos_sin) for _ in range(LAYERS)]
            for op, variants in ops.items():
                for name, run in variants.items():
                    calls = [functools.partial(run, i) for i in sets]
                    row: dict = {"op": op, "model": model, "tokens": tokens, "variant": name}
                    try:
                        row.update(device_us=round(graph_us(calls), 2), eager_us=round(eager_us(calls), 2))
                    except Exception as exc:  # one broken variant must not cost the others' numbers
                        row.update(device_us=float("nan"), eager_us=float("nan"), error=repr(exc)[:300])
                    rows.append(row)
            del sets
            torch.cuda.empty_cache()
    return rows


def time_sampling(fi, g: torch.Generator) -> list[dict]:
    import triton

    rows = []
    vocab = 151936
    for n in (1, 32, 256):
        logits = (torch.randn(n, vocab, generator=g, device="cuda") * 3).to(torch.bfloat16)
        t, k, p, m = (torch.full((n,), x, device="cuda") for x in (0.8, 50, 0.9, 0.0))
        k = k.long()
        uniform = torch.rand(n, generator=g, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        keys = torch.randint(0, 2**62, (n,), generator=g, device="cuda")
        cases = {"filtered: sort path (top_k=50, top_p=0.9)": lambda: _sort_draw(logits, t, k, p, m, uniform),
                 "filtered: flashinfer (top_k=50, top_p=0.9)":
                     lambda: filtered_sample_flashinfer(fi, logits, t, k, p, None, gen),
                 "race (no filter), triton": lambda: race_sample_triton(logits, t, keys)}
        for name, fn in cases.items():
            ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
            rows.append({"op": "sampling", "rows": n, "vocab": vocab, "variant": name, "device_us": round(1e3 * ms, 1)})
    return rows


# ---- the few-row linears (--gemv) --------------------------------------------------------------

GEMV_ROWS = (1, 2, 4)
GEMV_TILES = (triton_gemv.Tile(2, 2048, 4), triton_gemv.Tile(4, 1024, 4), triton_gemv.Tile(4, 2048, 8),
              triton_gemv.Tile(8, 512, 4), triton_gemv.Tile(8, 1024, 8), triton_gemv.Tile(16, 512, 4),
              triton_gemv.Tile(16, 256, 2), triton_gemv.Tile(32, 256, 4))


def gemv_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """(linear, prologue, N, K) of one decoder layer of model `name`."""
    mc = ModelConfig.load(CONFIGS / name)
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    return [("qkv", triton_gemv.ADD_RMSNORM, q + 2 * kv, mc.hidden_size), ("o", triton_gemv.LINEAR, mc.hidden_size, q),
            ("gate_up", triton_gemv.ADD_RMSNORM, 2 * mc.intermediate_size, mc.hidden_size),
            ("down", triton_gemv.SILU_MUL, mc.hidden_size, mc.intermediate_size)]


def _gemv_call(prologue: int, x: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor,
               kernel: str, tile: triton_gemv.Tile | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """One linear with its prologue, through the torch path or the GEMV (with `tile`)."""
    if kernel == "triton" and tile is not None:
        return lambda: triton_gemv.gemv(x, w, None, prologue, residual, norm_w, EPS, tile)
    if prologue == triton_gemv.ADD_RMSNORM:
        return lambda: fused.norm_linear(x, residual, norm_w, EPS, w, kernel=kernel)
    if prologue == triton_gemv.SILU_MUL:
        return lambda: (fused.silu_mul_linear(x, w, kernel=kernel), None)
    return lambda: (fused.linear(x, w, kernel=kernel), None)


def gemv_rows(g: torch.Generator, timing: bool) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for name in MODELS:
        sets = LAYERS if name == "qwen3-0.6b" else 6  # 8B: each layer's weights alone are over L2's 50 MB
        for op, prologue, n, k in gemv_shapes(name):
            weights = [torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k ** 0.5
                       for _ in range(sets)]
            norm_w = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
            for m in GEMV_ROWS:
                width = 2 * k if prologue == triton_gemv.SILU_MUL else k
                xs = [torch.randn(m, width, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(sets)]
                rs = [torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(sets)]
                want, want_res = _gemv_call(prologue, xs[0].clone(), rs[0].clone(), norm_w, weights[0], "torch")()
                got, got_res = _gemv_call(prologue, xs[0], rs[0], norm_w, weights[0], "triton")()
                err = rel_err(got, want)
                res_equal = got_res is None or bool(torch.equal(got_res, want_res))
                passed = err < 1e-2 and res_equal and not bool(got.isnan().any())
                ok &= passed
                row = {"op": "gemv", "model": name, "linear": op, "n": n, "k": k, "rows": m, "rel_err": err,
                       "residual_equal": res_equal, "pass": passed}
                if timing:
                    def per_layer(kernel: str, tile: triton_gemv.Tile | None = None) -> float:
                        # The torch path's FlashInfer add + norm works in place: fresh inputs for the graph.
                        cs = [_gemv_call(prologue, xs[i].clone(), rs[i].clone(), norm_w, weights[i], kernel, tile)
                              for i in range(sets)]
                        return round(graph_us(cs), 2)

                    row["torch_us"] = per_layer("torch")
                    row["gemv_us"] = per_layer("triton")
                    row["gemv_tile"] = list(triton_gemv.default_tile(n, k))
                    if m == 1 and name == MODELS[0]:  # the sweep at Qwen3-0.6B's shapes (each tile compiles)
                        row["tiles_us"] = {"x".join(map(str, t)): per_layer("triton", t) for t in GEMV_TILES}
                    bytes_per_s = n * k * 2 / (row["gemv_us"] * 1e-6)
                    row["gemv_weight_tb_s"] = round(bytes_per_s / 1e12, 2)
                rows.append(row)
                print(f"{name:<11}{op:<8}{n:>6}x{k:<6}m={m} rel_err {err:.2e} residual equal {res_equal} "
                      + (f"torch {row['torch_us']:7.2f} us  gemv {row['gemv_us']:7.2f} us "
                         f"({row['gemv_weight_tb_s']} TB/s)" if timing else "")
                      + (f"  tiles {row['tiles_us']}" if "tiles_us" in row else ""), flush=True)
            del weights
    return rows, ok


def gemv_summary(rows: list[dict]) -> dict:
    """Per model and row count: the four linears (and their prologues) of all layers, torch path vs GEMV, ms."""
    out = {}
    for name in MODELS:
        layers = ModelConfig.load(CONFIGS / name).num_hidden_layers
        for m in GEMV_ROWS:
            sel = [r for r in rows if r["model"] == name and r["rows"] == m and "torch_us" in r]
            if sel:
                out[f"{name}_rows{m}"] = {"torch_ms": round(layers * sum(r["torch_us"] for r in sel) / 1e3, 3),
                                          "gemv_ms": round(layers * sum(r["gemv_us"] for r in sel) / 1e3, 3),
                                          "layers": layers}
    return out


# ---- the fused decode attention (--decode) ------------------------------------------------------

DECODE_ROWS = (1, 2, 4, 8)
DECODE_CONTEXTS = (128, 640, 2048, 8192)
DECODE_SPLITS = (8, 16, 32)  # swept at one row and 640 and 8,192 tokens of context, with tokens a step and warps:
DECODE_TILES = ((32, 8), (32, 4), (64, 8), (16, 4))
DECODE_BATCH_ROWS = (32, 64, 256)  # --decode-batch: an offline run's decode steps
DECODE_BATCH_CONTEXTS = (512, 1024)


class DecodeInputs:
    """One layer's decode step: rows of `contexts` tokens each (the new one last) on shuffled pages of a
    random bf16 cache, and their new tokens' fused QKV output."""

    def __init__(self, heads: int, kv_heads: int, dim: int, contexts: Sequence[int], g: torch.Generator,
                 cos_sin: torch.Tensor) -> None:
        rows = len(contexts)
        ctx = torch.tensor(contexts, dtype=torch.int32, device="cuda")
        per_row = (ctx + PAGE - 1) // PAGE
        pages = int(per_row.sum())
        self.k_cache = torch.randn(pages + 1, PAGE, kv_heads, dim, generator=g, device="cuda").to(torch.bfloat16)
        self.v_cache = torch.randn(self.k_cache.shape, generator=g, device="cuda").to(torch.bfloat16)
        self.indices = torch.randperm(pages, generator=g, device="cuda").to(torch.int32)
        self.indptr = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)]).to(torch.int32)
        self.last_page_len = ctx - (per_row - 1) * PAGE
        last_pages = self.indices[self.indptr[1:].long() - 1].long()
        self.out_loc = last_pages * PAGE + self.last_page_len.long() - 1
        self.positions = ctx.long() - 1
        self.qkv = Inputs(heads, kv_heads, dim, rows, g, cos_sin)  # its q/k/v views, norm weights, cos_sin
        self.qkv.positions = self.positions


def _flashinfer_decode(flashinfer, i: DecodeInputs, heads: int, kv_heads: int, dim: int,
                       buffer: torch.Tensor) -> Callable[[], torch.Tensor]:
    """What the fused kernel replaces: Q/K norm + RoPE, the K/V store, FlashInfer's decode (tensor cores)."""
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        buffer, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=i.indptr.clone(),
        paged_kv_indices_buffer=i.indices.clone(), paged_kv_last_page_len_buffer=i.last_page_len.clone())
    wrapper.plan(i.indptr.cpu(), i.indices, i.last_page_len.cpu(), heads, kv_heads, dim, PAGE,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=dim ** -0.5)
    x = i.qkv

    def run() -> torch.Tensor:
        fused.qk_norm_rope_(x.q, x.k, i.positions, x.cos_sin, x.q_weight, x.k_weight, EPS)
        fused.store_kv(i.k_cache, i.v_cache, i.out_loc, x.k, x.v)
        return wrapper.run(x.q, (i.k_cache, i.v_cache))

    return run


def _fused_decode(i: DecodeInputs, workspace: triton_decode.Workspace, splits: int,
                  tile: tuple[int, int] = (triton_decode.BLOCK_N, triton_decode.NUM_WARPS)) -> Callable[[], torch.Tensor]:
    x = i.qkv
    return lambda: triton_decode.decode_attention(
        x.q, x.k, x.v, i.k_cache, i.v_cache, i.indptr, i.indices, i.last_page_len, i.out_loc, i.positions,
        x.cos_sin, x.q_weight, x.k_weight, EPS, x.q.shape[-1] ** -0.5, workspace, splits, *tile)


def _decode_case(flashinfer, name: str, shape: tuple[int, int, int], contexts: list[int], label: int,
                 workspace: triton_decode.Workspace, splits: int, buffer: torch.Tensor, g: torch.Generator,
                 cos_sin: torch.Tensor, timing: bool, sweep: Sequence[int] = ()) -> dict:
    """One (rows, contexts) case: the fused kernel's output and stored K/V against the FlashInfer path's, and
    with `timing` both timed in graphs over distinct caches; with `sweep`, those split counts x DECODE_TILES."""
    heads, kv_heads, dim = shape
    rows = len(contexts)
    # Distinct caches per layer as in a decode step (no L2 reuse), within ~8 GB.
    sets = max(1, min(LAYERS, (8 << 30) // (sum(contexts) * kv_heads * dim * 4)))
    inputs = [DecodeInputs(heads, kv_heads, dim, contexts, g, cos_sin) for _ in range(sets)]
    # The check, on fresh copies (the reference rewrites q and k in place).
    i = inputs[0]
    q, k, v = i.qkv.q.clone(), i.qkv.k.clone(), i.qkv.v.clone()
    caches = i.k_cache.clone(), i.v_cache.clone()
    got = _fused_decode(i, workspace, splits)()
    got_k, got_v = i.k_cache.view(-1, kv_heads, dim)[i.out_loc], i.v_cache.view(-1, kv_heads, dim)[i.out_loc]
    i.k_cache.copy_(caches[0])
    i.v_cache.copy_(caches[1])
    want = _flashinfer_decode(flashinfer, i, heads, kv_heads, dim, buffer)()
    want_k, want_v = i.k_cache.view(-1, kv_heads, dim)[i.out_loc], i.v_cache.view(-1, kv_heads, dim)[i.out_loc]
    i.qkv.q.copy_(q)
    i.qkv.k.copy_(k)
    assert torch.equal(i.qkv.v, v)
    err = rel_err(got, want)
    kv_err = max(rel_err(got_k, want_k), rel_err(got_v, want_v))
    passed = err < 1e-2 and kv_err < 1e-2 and not bool(got.isnan().any())
    row = {"op": "decode_attention", "model": name, "rows": rows, "context": label, "splits": splits,
           "rel_err": err, "kv_rel_err": kv_err, "pass": passed}
    if label != contexts[0] or len(set(contexts)) > 1:
        row["contexts"] = [min(contexts), max(contexts)]
    if timing:
        row["flashinfer_us"] = round(graph_us([_flashinfer_decode(flashinfer, x, heads, kv_heads, dim, buffer)
                                               for x in inputs]), 2)
        row["fused_us"] = round(graph_us([_fused_decode(x, workspace, splits) for x in inputs]), 2)
        if sweep:
            row["splits_us"] = {f"{s} splits, {n} tokens, {w} warps": round(graph_us(
                [_fused_decode(x, workspace, s, (n, w)) for x in inputs]), 2)
                for s in sweep for n, w in DECODE_TILES}
        # What the fused kernel reads (the cached K/V) over its time, for the large batches' bandwidth.
        row["fused_tb_s"] = round(sum(contexts) * kv_heads * dim * 4 / row["fused_us"] / 1e6, 2)
        row["flashinfer_tb_s"] = round(sum(contexts) * kv_heads * dim * 4 / row["flashinfer_us"] / 1e6, 2)
    print(f"{name:<11}rows={rows:<3} context={label:<5} splits={splits:<3} rel_err {err:.2e} kv {kv_err:.2e}"
          + (f"  flashinfer path {row['flashinfer_us']:7.2f} us ({row['flashinfer_tb_s']:.2f} TB/s)  fused "
             f"{row['fused_us']:7.2f} us ({row['fused_tb_s']:.2f} TB/s)" if timing else "")
          + (f"  splits {row['splits_us']}" if "splits_us" in row else ""), flush=True)
    del inputs
    return row


def decode_rows(flashinfer, shapes: dict[str, tuple[int, int, int]], cos_sin: torch.Tensor, g: torch.Generator,
                timing: bool, batch: bool = False) -> tuple[list[dict], bool]:
    """The few-row cases (DECODE_ROWS x DECODE_CONTEXTS, every row one context), or with `batch` the full
    batches of an offline run (DECODE_BATCH_ROWS rows, contexts drawn uniformly from a quarter to 1.75x
    each of DECODE_BATCH_CONTEXTS)."""
    rows_out = []
    buffer = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(0)
    for name in MODELS:
        heads, kv_heads, dim = shapes[name]
        most = max(DECODE_BATCH_ROWS if batch else DECODE_ROWS)
        workspace = triton_decode.Workspace(most, kv_heads, heads // kv_heads, dim, torch.device("cuda"))
        for rows in DECODE_BATCH_ROWS if batch else DECODE_ROWS:
            splits = triton_decode.default_splits(rows, kv_heads, torch.device("cuda"))
            for context in DECODE_BATCH_CONTEXTS if batch else DECODE_CONTEXTS:
                if batch:
                    contexts = rng.integers(context // 4, context * 7 // 4, rows, endpoint=True).tolist()
                    sweep: Sequence[int] = (1, 2) if rows == max(DECODE_BATCH_ROWS) else ()
                else:
                    contexts = [context] * rows
                    sweep = DECODE_SPLITS if rows == 1 and context in (640, 8192) else ()
                rows_out.append(_decode_case(flashinfer, name, shapes[name], contexts, context, workspace, splits,
                                             buffer, g, cos_sin, timing, sweep))
    return rows_out, all(r["pass"] for r in rows_out)


# ---- report ------------------------------------------------------------------------------------


def summary(rows: list[dict], layers: int = 28) -> dict:
    """Qwen3-0.6B: the attention block's per-token work over all layers, before vs now."""
    def us(op: str, variant: str, tokens: int) -> float:
        return next(r["device_us"] for r in rows if (r["op"], r["model"], r["tokens"], r["variant"]) ==
                    (op, "qwen3-0.6b", tokens, variant))

    out = {}
    for tokens, label in ((2048, "prefill_2048"), (1, "decode_bs1"), (256, "decode_bs256")):
        before = us("qk_norm_rope", "before (copies, 2 norms, rope)", tokens) + us("store_kv", "before (index_copy_ x2)", tokens)
        now = us("qk_norm_rope", "triton", tokens) + us("store_kv", "triton", tokens)
        out[label] = {"before_ms": round(layers * before / 1e3, 3), "now_ms": round(layers * now / 1e3, 3)}
    return out


def print_table(rows: list[dict]) -> None:
    """Device us per call (graph of 28) for each variant; eager us per call (host cost) at T=1."""
    for op in ("qk_norm_rope", "rope", "store_kv"):
        names = list(dict.fromkeys(r["variant"] for r in rows if r["op"] == op))
        print(f"\n{op}, device us per call: " + " | ".join(f"[{j}] {n}" for j, n in enumerate(names)))
        print(f"{'model':<11}{'T':>5}" + "".join(f"{f'[{j}]':>9}" for j in range(len(names))))
        for model in MODELS:
            for tokens in TIME_TOKENS:
                cells = [next(x for x in rows if (x["op"], x["model"], x["tokens"], x["variant"]) == (op, model, tokens, n))
                         for n in names]
                print(f"{model:<11}{tokens:>5}" + "".join(f"{c['device_us']:>9.1f}" for c in cells))
        eager = [next(x for x in rows if (x["op"], x["model"], x["tokens"], x["variant"]) == (op, MODELS[0], 1, n))
                 for n in names]
        print(f"{'eager, T=1':<16}" + "".join(f"{c['eager_us']:>9.1f}" for c in eager))
    print("\nsampling, rows x 151936 bf16 logits, eager us:")
    for r in rows:
        if r["op"] == "sampling":
            print(f"  rows={r['rows']:<4} {r['variant']:<46}{r['device_us']:>9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--with-fi-append", action="store_true",
                    help="also FlashInfer's append_paged_kv_cache (JIT-builds its page module when not cached)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--gemv", action="store_true", help="the few-row linears only (kernels/triton_gemv.py)")
    ap.add_argument("--decode", action="store_true",
                    help="the fused decode attention only (kernels/triton_decode.py)")
    ap.add_argument("--decode-batch", action="store_true",
                    help="with --decode: at an offline run's batches (32-256 rows of mixed contexts) instead")
    args = ap.parse_args()
    import flashinfer
    import triton

    t0 = time.time()
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {}
    for name in MODELS:
        mc = ModelConfig.load(CONFIGS / name)
        shapes[name] = (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
    theta = ModelConfig.load(CONFIGS / MODELS[0]).rope_theta
    cos_sin = RotaryEmbedding(shapes[MODELS[0]][2], MAX_POS, theta).cos_sin.cuda()
    report: dict = {**provenance("llmrpc.bench.kernel_check"), "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "triton": triton.__version__, "flashinfer": flashinfer.__version__}
    if args.gemv:
        report["gemv"], report["all_pass"] = gemv_rows(g, timing=not args.skip_timing)
        report["summary_gemv"] = gemv_summary(report["gemv"])
        print("per token, the 4 linears + prologues of all layers (device ms):", json.dumps(report["summary_gemv"]))
        report["seconds"] = round(time.time() - t0, 1)
        if args.out:
            write_json(Path(args.out), report)
        print("GEMV ALL PASS" if report["all_pass"] else "SOME GEMV CHECKS FAILED")
        return
    if args.decode:
        report["decode"], report["all_pass"] = decode_rows(flashinfer, shapes, cos_sin, g, timing=not args.skip_timing,
                                                           batch=args.decode_batch)
        report["seconds"] = round(time.time() - t0, 1)
        if args.out:
            write_json(Path(args.out), report)
        print("DECODE ALL PASS" if report["all_pass"] else "SOME DECODE CHECKS FAILED")
        return
    checks = {
        "qk_norm_rope": lambda: check_in_place(norm_rope_variants(), True, shapes, cos_sin, g),
        "rope": lambda: check_in_place(rope_variants(), False, shapes, cos_sin, g),
        "store_kv": lambda: check_store(store_variants(args.with_fi_append), shapes, cos_sin, g),
        "race": lambda: check_race(g),
        "filtered": lambda: check_filtered(flashinfer, g),
    }
    report["all_pass"] = run_checks(checks, report)
    if args.out:  # the checks survive a timing phase cut short
        write_json(Path(args.out), report)
    if not args.skip_timing:
        rows = time_ops(shapes, cos_sin, g, args.with_fi_append) + time_sampling(flashinfer, g)
        report["timings"] = rows
        report["summary_qwen3_0.6b_28_layers"] = summary(rows)
        print_table(rows)
        print("\nQwen3-0.6B, Q/K norm + RoPE + K/V store over 28 layers (device ms):",
              json.dumps(report["summary_qwen3_0.6b_28_layers"]))
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        write_json(Path(args.out), report)
    print("KERNELS ALL PASS" if report["all_pass"] else "SOME KERNEL CHECKS FAILED")


if __name__ == "__main__":
    main()
