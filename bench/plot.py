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


def label(row: dict) -> str:
    name = row["system"]
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
        plot_vs_seed(plt, args.vs_seed, Path(args.out or args.vs_seed / "vs-seed.png"))
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


def plot_vs_seed(plt, run: Path, out: Path) -> None:
    rows = [r for f in sorted(run.glob("offline-*.json")) + sorted(run.glob("latency-*.json"))
            for r in json.loads(f.read_text()) if not r.get("error")]
    panels = [("offline workload (output tok/s)", "offline", "output_tokens_per_s"),
              ("single stream, 128 -> 512 tokens (tok/s)", "single_stream_decode", "output_tokens_per_s"),
              ("TTFT, 2,048-token prompt (ms, lower is better)", "ttft_2048", "ttft_ms")]
    panels = [p for p in panels if any(r.get("metric", "offline") == p[1] and r.get(p[2]) for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels), 5), squeeze=False)
    order = {"roofline": 0, "mini-sglang": 1, "llmrpc-stack": 2, "llmrpc-engine": 3}
    for ax, (title, metric, key) in zip(axes[0], panels):
        mine = [r for r in rows if r.get("metric", "offline") == metric and r.get(key)]
        mine.sort(key=lambda r: (order.get(r["system"], 9), r.get("overlap") is False, r.get("decode_steps", 1)))
        ys = [r[key] for r in mine]
        bars = ax.bar([label(r) for r in mine], ys, color=[COLORS.get(r["system"], "#555555") for r in mine])
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:,.1f}" if y < 100 else f"{y:,.0f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    model, gpu = rows[0]["model"], rows[0].get("gpu", "")
    fig.suptitle(f"{model}, 1x {gpu}: llmrpc vs mini-sglang (same call), {run.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
