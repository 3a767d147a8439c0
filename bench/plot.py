"""PNGs from the JSON rows under bench/results/.

  (default)         offline output tokens/s per system, per model, from every offline-*.json
  --vs-seed DIR     one GPU run's figures beside mini-sglang's (bench/seed_compare.py's files in DIR):
                    offline (with the roofline), single-stream decode and TTFT(2048), each llmrpc row
                    labelled with its overlap depth and decode passes per step
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


KERNELS = ("flashinfer_prefill", "flashinfer_decode", "gemv_max_rows", "fused_decode_max_rows")  # shown on a bar when the rows beside it differ in them


def label(row: dict, kernels: bool = False) -> str:
    name = row["system"]
    if kernels and row["system"].startswith("llmrpc"):
        short = {"tensor-cores": "TC", "cuda-cores": "CC"}
        name += "\n" + "+".join(short.get(v, v) for v in (str(row.get(k, "auto")) for k in KERNELS))
    if row.get("overlap") is False:
        name += "\n(no overlap)"
    if row.get("decode_steps", 1) > 1:
        name += f"\nk={row['decode_steps']}"
    if row["system"] == "hf-transformers" and not row.get("complete", True):
        name += "\n(partial)"
    return name


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--vs-seed", type=Path, help="a run's directory with offline-*.json and latency-*.json")
    args = ap.parse_args()
    if args.vs_seed:
        out = Path(args.out or args.vs_seed / "vs-seed.png")
        rows = [r for f in sorted(args.vs_seed.glob("offline-*.json")) + sorted(args.vs_seed.glob("latency-*.json"))
                for r in json.loads(f.read_text()) if not r.get("error")]
        models = sorted({r["model"] for r in rows})
        for model in models:  # one figure per model; a folder of two models names each by its model
            path = out if len(models) == 1 else out.with_name(f"{out.stem}-{model}{out.suffix}")
            plot_vs_seed(plt, [r for r in rows if r["model"] == model], args.vs_seed.name, path)
        return
    args.out = args.out or str(RESULTS / "offline.png")
    rows = []
    for f in sorted(RESULTS.glob("offline-*.json")):
        rows += [r for r in json.loads(f.read_text()) if r["benchmark"] == "offline" and r["output_tokens_per_s"]]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5), squeeze=False)
    colors = {"roofline": "#999999", "llmrpc-engine": "#1f77b4", "llmrpc-stack": "#2ca02c", "hf-transformers": "#d62728"}
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        order = {"roofline": 0, "llmrpc-stack": 1, "llmrpc-engine": 2, "hf-transformers": 3}
        mine.sort(key=lambda r: (order.get(r["system"], 9), r.get("overlap") is False))
        xs = [label(r) for r in mine]
        ys = [r["output_tokens_per_s"] for r in mine]
        bars = ax.bar(xs, ys, color=[colors.get(r["system"], "#555555") for r in mine])
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model}: offline workload, 1x {mine[0]['gpu']}")
        ax.set_ylabel("output tokens / s")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


COLORS = {"roofline": "#999999", "mini-sglang": "#ff7f0e", "llmrpc-engine": "#1f77b4", "llmrpc-stack": "#2ca02c"}


def plot_vs_seed(plt, rows: list[dict], run: str, out: Path) -> None:
    """One model's rows of one run: a panel per benchmark, llmrpc's bars beside the seed's and the roofline."""
    panels = [("offline workload (output tok/s)", "offline", "output_tokens_per_s"),
              ("single stream, 128 -> 512 tokens (tok/s)", "single_stream_decode", "output_tokens_per_s"),
              ("TTFT, 2,048-token prompt (ms, lower is better)", "ttft_2048", "ttft_ms")]
    panels = [p for p in panels if any(r.get("metric", "offline") == p[1] and r.get(p[2]) for r in rows)]
    widest = max(sum(1 for r in rows if r.get("metric", "offline") == p[1] and r.get(p[2])) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.7, 0.95 * widest) * len(panels), 5.4), squeeze=False)
    order = {"roofline": 0, "mini-sglang": 1, "llmrpc-stack": 2, "llmrpc-engine": 3}
    for ax, (title, metric, key) in zip(axes[0], panels):
        mine = [r for r in rows if r.get("metric", "offline") == metric and r.get(key)]
        mine.sort(key=lambda r: (order.get(r["system"], 9), r.get("overlap") is False, r.get("decode_steps", 1)))
        ys = [r[key] for r in mine]
        kernels = len({tuple(r.get(k) for k in KERNELS) for r in mine if r["system"].startswith("llmrpc")}) > 1
        xs = list(range(len(mine)))  # positions, not names: two rows of one label still get a bar each
        bars = ax.bar(xs, ys, color=[COLORS.get(r["system"], "#555555") for r in mine])
        ax.set_xticks(xs, [label(r, kernels) for r in mine])
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:,.1f}" if y < 100 else f"{y:,.0f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    model, gpu = rows[0]["model"], rows[0].get("gpu", "")
    fig.suptitle(f"{model}, 1x {gpu}: llmrpc vs mini-sglang (same call), {run}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
