"""The fused MoE on a GPU: correctness against the torch reference, CUDA-graph capture, time per layer.

One sparse layer at the shape of a config.json (default Qwen3-30B-A3B: 128 experts, 8 per token,
hidden 2048, expert width 768, or its 1/tp slice with --tp), bf16, random weights scaled so
activations stay O(1). For each batch size:

  error    relative error (Frobenius) against the reference in float32 on the same bf16 weights and
           routing, for the Triton path and for the torch path in bf16 (the rounding floor). PASS when
           the Triton error is at most 2x the torch bf16 error + 1e-3 (bench/gpu_check.py's criterion);
           the Triton and torch alignments must hold the same pairs in every expert's run.
  graph    the whole MoE block (router, top-k, align, both GEMMs, sum) captured in a CUDA graph and
           replayed on new inputs: it must equal the eager result exactly.
  time     median over --reps of CUDA events: the block eager, the block replayed from its graph, the
           torch reference in bf16; the experts' weights read by that step (the distinct experts it
           routed to) over the graph time, against the measured copy bandwidth.

--sweep also times a grid of tile configurations per batch and reports the fastest (for
kernels/moe_triton.py's TILES). Prints a table; writes JSON (--out).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmrpc.bench.record import provenance, write_json
from llmrpc.bench.sampling_bench import time_ms
from llmrpc.engine.config import ModelConfig
from llmrpc.engine.layers.moe import SparseMoeBlock
from llmrpc.engine.parallel import TensorParallel
from llmrpc.kernels import moe

if TYPE_CHECKING:
    from llmrpc.kernels.moe_triton import MoETiles

CONFIGS = Path(__file__).resolve().parent / "configs"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def build_layer(config: ModelConfig, tp: int, seed: int) -> SparseMoeBlock:
    m = config.moe
    assert m is not None, f"{config.name} is not a mixture-of-experts model"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        layer = SparseMoeBlock(config.hidden_size, m.num_experts, m.num_experts_per_tok,
                               m.moe_intermediate_size // tp, m.norm_topk_prob, TensorParallel())
    layer = layer.to(torch.bfloat16)
    with torch.no_grad():
        h, i = config.hidden_size, layer.experts.intermediate_size
        layer.gate.weight.normal_(0.0, 0.02)  # as dummy weights: near-uniform routing
        layer.experts.gate_up_proj.normal_(0.0, h ** -0.5)
        layer.experts.down_proj.normal_(0.0, i ** -0.5)
    return layer


def same_rows_per_expert(a: moe.MoEAlignment, b: moe.MoEAlignment) -> bool:
    """The same padded layout, and each expert's run holding the same pairs.

    Within a run the order is free (the Triton kernel scatters by atomics), so a run longer than
    one block may split its pairs between its blocks differently: compare runs, not blocks.
    """
    n = int(a.num_padded)
    if n != int(b.num_padded) or not torch.equal(a.expert_ids[: n // a.block_m], b.expert_ids[: n // a.block_m]):
        return False
    expert_of_row = a.expert_ids[: n // a.block_m].repeat_interleave(a.block_m).long()
    span = int(max(a.sorted_ids[:n].max(), b.sorted_ids[:n].max())) + 1

    def runs(x: moe.MoEAlignment) -> torch.Tensor:
        return (expert_of_row * span + x.sorted_ids[:n].long()).sort().values

    return torch.equal(runs(a), runs(b)) and torch.equal(a.sorted_ids[n:], b.sorted_ids[n:])


def sweep_tiles() -> list[MoETiles]:
    from llmrpc.kernels.moe_triton import MoETiles, TileConfig

    grid = []
    for block_m, (gn, dn), block_k, (warps, stages) in itertools.product(
            (16, 32, 64), ((32, 64), (64, 128), (128, 128)), (64, 128), ((4, 3), (4, 4), (8, 3))):
        grid.append(MoETiles(block_m, TileConfig(gn, block_k, 8 if block_m >= 64 else 1, warps, stages),
                             TileConfig(dn, block_k, 8 if block_m >= 64 else 1, warps, stages)))
    return grid


def check_batch(layer: SparseMoeBlock, batch: int, reps: int, bandwidth: float, sweep: bool) -> dict:
    from llmrpc.kernels.moe_triton import ALIGN_KERNEL_MAX_PAIRS, fused_moe_triton, moe_align_triton, moe_tiles

    experts = layer.experts
    w13, w2 = experts.gate_up_proj, experts.down_proj
    x = torch.randn(batch, w13.shape[2], device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        weights, ids = layer.gate(x)
        reference = moe.fused_moe_torch(x.float(), w13.float(), w2.float(), weights, ids)
        torch_bf16 = moe.fused_moe_torch(x, w13, w2, weights, ids)
        fused = fused_moe_triton(x, w13, w2, weights, ids)
        tiles = moe_tiles(batch)
        aligned = None  # past the align kernel's limit only the torch alignment runs
        if ids.numel() <= ALIGN_KERNEL_MAX_PAIRS:
            aligned = same_rows_per_expert(moe_align_triton(ids, experts.num_experts, tiles.block_m),
                                          moe.moe_align_torch(ids, experts.num_experts, tiles.block_m))
        err_fused, err_torch = rel_err(fused, reference), rel_err(torch_bf16, reference)

        # The block in a CUDA graph, replayed on fresh inputs, against eager on the same inputs.
        static_x = x.clone()
        eager = layer(static_x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                static_out = layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        graph_equal = bool(torch.equal(static_out, layer(x2)))
        static_x.copy_(x)
        graph.replay()
        graph_equal &= bool(torch.equal(static_out, eager))

        eager_ms = time_ms(lambda: layer(static_x), reps)
        graph_ms = time_ms(graph.replay, reps)
        torch_ms = time_ms(lambda: moe.fused_moe_torch(x, w13, w2, weights, ids), max(3, reps // 10))
        touched = int(torch.unique(ids).numel())
        expert_bytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size()
        row = {
            "batch": batch, "rel_err_triton": err_fused, "rel_err_torch_bf16": err_torch,
            "pass": err_fused <= 2 * err_torch + 1e-3 and aligned is not False and graph_equal,
            "alignments_agree": aligned, "graph_equals_eager": graph_equal,
            "block_m": tiles.block_m, "eager_ms": eager_ms, "graph_ms": graph_ms, "torch_ms": torch_ms,
            "experts_touched": touched, "expert_weights_MB": expert_bytes / 1e6,
            "weight_GB_s": expert_bytes / (graph_ms / 1e3) / 1e9,
            "bandwidth_fraction": expert_bytes / (graph_ms / 1e3) / bandwidth,
        }
        if sweep:
            best: tuple[float, MoETiles] | None = None
            for t in sweep_tiles():
                try:
                    ms = time_ms(lambda t=t: fused_moe_triton(x, w13, w2, weights, ids, tiles=t), reps // 2 + 1)
                except Exception as exc:  # a tile the GPU cannot hold (shared memory): skip it
                    print(f"  tiles {t}: {type(exc).__name__}", flush=True)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, t)
            if best is not None:
                row["sweep_best_ms"] = best[0]
                row["sweep_best_tiles"] = repr(best[1])
                row["default_fused_ms"] = time_ms(lambda: fused_moe_triton(x, w13, w2, weights, ids), reps)
        return row


def main() -> None:
    from llmrpc.bench.roofline import measure_rates

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(CONFIGS / "qwen3-30b-a3b"), help="directory with config.json")
    ap.add_argument("--batches", default="1,64,256,2048",
                    help="tokens per step, comma-separated (2048: a prefill chunk, the sort-based align)")
    ap.add_argument("--tp", type=int, default=1, help="time one rank's shard: expert width / tp")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configurations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    config = ModelConfig.load(args.model)
    layer = build_layer(config, args.tp, args.seed)
    bandwidth, _ = measure_rates()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append(check_batch(layer, batch, args.reps, bandwidth, args.sweep))
        print(rows[-1], flush=True)
    print(f"\n{config.name}, tp {args.tp} (expert width {layer.experts.intermediate_size}), "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'batch':>6}{'err triton':>12}{'err bf16':>10}{'eager ms':>10}{'graph ms':>10}{'torch ms':>10}"
          f"{'experts':>9}{'GB/s':>8}{'of bw':>7}  pass")
    for r in rows:
        print(f"{r['batch']:>6}{r['rel_err_triton']:>12.2e}{r['rel_err_torch_bf16']:>10.2e}{r['eager_ms']:>10.3f}"
              f"{r['graph_ms']:>10.3f}{r['torch_ms']:>10.2f}{r['experts_touched']:>9}{r['weight_GB_s']:>8.0f}"
              f"{r['bandwidth_fraction']:>7.2f}  {'PASS' if r['pass'] else 'FAIL'}")
    gpu = torch.cuda.get_device_name()
    import triton

    result = {**provenance("llmrpc.bench.moe_check", gpu=gpu, torch=torch.__version__, triton=triton.__version__),
              "model": config.name, "tp": args.tp, "bandwidth_GB_s": bandwidth / 1e9, "rows": rows,
              "all_pass": all(r["pass"] for r in rows)}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe-check-{config.name}.json"
    write_json(out, result)


if __name__ == "__main__":
    main()
