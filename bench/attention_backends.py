"""FlashInfer's attention kernels at llmrpc's shapes: which kernel each kind of step should run, measured.

prefill  one 2,048-token prompt with nothing cached, and a 1,024-token chunk after a cached 1,024-token
         prefix (one layer's attention, 16-token pages): the paged wrapper on fa2 (the engine's kernel
         before fa3) and on fa3, and, for the uncached prompt, the ragged wrapper over the chunk's own K/V
         (contiguous here; the engine passes views into its QKV output) on fa2 and fa3
decode   B rows of C tokens of context each: tensor-core decode (the engine's default) and CUDA-core
         decode, each with FlashInfer's split-KV and without it (disable_split_kv)

Every variant's output is compared with the first variant's (max abs difference; bf16 rounding is
~1e-2); a variant that does not build or run is reported with its error. Times: device µs per call from a
CUDA graph of 28 calls (one per layer) replayed under triton's do_bench, as bench/kernel_check.py times its
ops; `first_call_s` is the first call's wall time, which holds FlashInfer's JIT build on a cold cache.

  python -m llmrpc.bench.attention_backends [--out bench/results/.../attention-backends.json]
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Callable

import torch

from llmrpc.bench.kernel_check import CONFIGS, MODELS, graph_us
from llmrpc.bench.record import provenance, write_json
from llmrpc.engine.config import ModelConfig

PAGE = 16
LAYERS = 28
WORKSPACE_BYTES = 256 << 20
PREFILL_CASES = ((2048, 0), (1024, 1024))  # (new tokens, cached prefix)
DECODE_CASES = ((1, 512), (8, 1024), (64, 1024), (256, 800))  # (rows, context per row)


class Cache:
    """A paged K/V cache of random bf16 pages, rows laid out on shuffled pages."""

    def __init__(self, rows: list[int], kv_heads: int, dim: int, g: torch.Generator) -> None:
        pages_of = [-(-n // PAGE) for n in rows]
        total = sum(pages_of)
        self.k = torch.randn(total + 1, PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        self.v = torch.randn_like(self.k)
        self.indices = torch.randperm(total, device="cuda", generator=g).to(torch.int32)
        self.indptr = torch.tensor([0, *itertools.accumulate(pages_of)], dtype=torch.int32)
        self.last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(rows, pages_of)], dtype=torch.int32)

    def contiguous(self, row_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's K and V as [tokens, heads, dim] (the ragged wrapper's input)."""
        pages = self.indices[: -(-row_tokens // PAGE)].long()
        k = self.k[pages].flatten(0, 1)[:row_tokens].contiguous()
        v = self.v[pages].flatten(0, 1)[:row_tokens].contiguous()
        return k, v


def prefill_variants(fi, ws: torch.Tensor, heads: int, kv_heads: int, dim: int, new: int, prefix: int,
                     g: torch.Generator) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    cache = Cache([prefix + new], kv_heads, dim, g)
    q = torch.randn(new, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    qo_indptr = torch.tensor([0, new], dtype=torch.int32)
    common = dict(causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=dim ** -0.5)

    def paged(backend: str):
        def build():
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo_indptr, cache.indptr, cache.indices, cache.last, heads, kv_heads, dim, PAGE, **common)
            return lambda: w.run(q, (cache.k, cache.v))
        return build

    def ragged(backend: str):
        def build():
            k, v = cache.contiguous(new)
            w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo_indptr, qo_indptr.clone(), heads, kv_heads, dim, **common)
            return lambda: w.run(q, k, v)
        return build

    variants = {"paged fa2": paged("fa2"), "paged fa3": paged("fa3")}
    if prefix == 0:
        variants.update({"ragged fa2": ragged("fa2"), "ragged fa3": ragged("fa3")})
    return variants


def decode_variants(fi, ws: torch.Tensor, heads: int, kv_heads: int, dim: int, rows: int, context: int,
                    g: torch.Generator) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    cache = Cache([context] * rows, kv_heads, dim, g)
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    def decode(tensor_cores: bool, split: bool):
        def build():
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
            w.plan(cache.indptr, cache.indices, cache.last, heads, kv_heads, dim, PAGE, q_data_type=torch.bfloat16,
                   kv_data_type=torch.bfloat16, sm_scale=dim ** -0.5, disable_split_kv=not split)
            return lambda: w.run(q, (cache.k, cache.v))
        return build

    return {"tensor cores, split": decode(True, True), "tensor cores, no split": decode(True, False),
            "cuda cores, split": decode(False, True), "cuda cores, no split": decode(False, False)}


def measure(case: str, variants: dict[str, Callable[[], Callable[[], torch.Tensor]]]) -> list[dict]:
    """Each variant built, checked against the first (the engine's kernel) and timed."""
    rows, reference = [], None
    for name, build in variants.items():
        row: dict = {"case": case, "variant": name}
        try:
            t = time.perf_counter()
            call = build()
            out = call()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t, 2)
            if reference is None:
                reference = out.float()
            row["max_abs_diff"] = float((out.float() - reference).abs().max())
            row["device_us"] = round(graph_us([call] * LAYERS), 2)
        except Exception as exc:  # a backend this build or GPU lacks: reported, the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        shown = (f"{row['device_us']:9.1f} us  diff {row['max_abs_diff']:.2e}  first call {row['first_call_s']} s"
                 if "error" not in row else row["error"])
        print(f"{case:<36}{name:<24}{shown}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import flashinfer

    g = torch.Generator(device="cuda").manual_seed(0)
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    report: dict = {**provenance("llmrpc.bench.attention_backends"), "gpu": torch.cuda.get_device_name(),
                    "flashinfer": flashinfer.__version__, "page_size": PAGE, "rows": []}
    for model in args.models.split(","):
        mc = ModelConfig.load(CONFIGS / model)
        shape = (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
        for new, prefix in PREFILL_CASES:
            case = f"{model} prefill {new} after {prefix}"
            report["rows"] += measure(case, prefill_variants(flashinfer, ws, *shape, new, prefix, g))
        for rows, context in DECODE_CASES:
            case = f"{model} decode {rows} x {context}"
            report["rows"] += measure(case, decode_variants(flashinfer, ws, *shape, rows, context, g))
        if args.out:  # what was measured survives a run cut short
            write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
