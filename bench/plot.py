"""One PNG from the JSON rows under bench/results/: offline output tokens/s per system, per model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def label(row: dict) -> str:
    name = row["system"]
    if row.get("overlap") is False:
        name += "\n(no overlap)"
    if row["system"] == "hf-transformers" and not row.get("complete", True):
        name += "\n(partial)"
    return name


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "offline.png"))
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
