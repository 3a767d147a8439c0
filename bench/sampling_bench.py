"""Sampling microbenchmark on the GPU: the inverse-CDF sampler it replaced vs the exponential race.

Times, with CUDA events (median of --iters after warm-up), sampling one full decode
batch of logits ([256, 151936] bf16 by default, Qwen3's vocabulary) at temperature
0.6 with no filters, the offline workload's setting:

- `before`: the previous path (float32 upcast, divide, softmax, one host uniform
  per row in a Python loop, cumsum, searchsorted), kept here as the baseline;
- `sampler`: `Sampler.sample` now (race keys drawn on the host, the Triton race kernel);
- `race_kernel`: the kernel alone; `race_torch`: the same race in plain torch ops;
- `greedy`: argmax, the floor of any one-pass sampler.

Also checks on the device: the kernel's tokens against the torch race reference
(same noise bits; they may differ only where float rounding decides a near-tie),
and the kernel's empirical distribution against softmax(logits / T) on an 8-token
vocabulary (chi-square, 7 degrees of freedom). Prints one JSON document (also --out).
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from llmrpc.engine.sampling import Sampler
from llmrpc.engine.step import SlotParams
from llmrpc.kernels.sampling import race_sample, race_sample_torch


def before(logits: torch.Tensor, temperature: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The sampler's unfiltered path before the race (commit 7a9ec84)."""
    probs = (logits.float() / temperature[:, None]).softmax(dim=-1)
    uniform = np.array([rng.random() for _ in range(logits.shape[0])])
    cdf = probs.cumsum(dim=-1)
    target = torch.from_numpy(uniform).to(logits.device, torch.float32, non_blocking=True)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[1] - 1).squeeze(1)


def time_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, device=dev, generator=gen) * 3).to(torch.bfloat16)
    temperature = torch.full((args.rows,), args.temperature, device=dev)
    inv_t = 1.0 / temperature
    keys = torch.randint(0, 2**62, (args.rows,), device=dev, generator=gen)
    sampler = Sampler(args.rows, args.vocab, dev, seed=0)
    for slot in range(args.rows):
        sampler.admit(SlotParams(slot, temperature=args.temperature))
    slots = np.arange(args.rows)
    positions = np.full(args.rows, 512)
    rng = np.random.default_rng(0)
    report: dict = {"rows": args.rows, "vocab": args.vocab, "dtype": "bfloat16", "temperature": args.temperature,
                    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["median_ms"] = {
        "before": time_ms(lambda: before(logits, temperature, rng), args.iters),
        "sampler": time_ms(lambda: sampler.sample(logits, slots, positions), args.iters),
        "race_kernel": time_ms(lambda: race_sample(logits, inv_t, keys), args.iters),
        "race_torch": time_ms(lambda: race_sample_torch(logits, inv_t, keys), args.iters),
        "greedy": time_ms(lambda: logits.argmax(dim=-1), args.iters),
    }
    report["speedup_sampler_vs_before"] = report["median_ms"]["before"] / report["median_ms"]["sampler"]
    # Kernel against the torch reference over fresh keys.
    same = total = 0
    for i in range(8):
        k = torch.randint(0, 2**62, (args.rows,), device=dev, generator=gen)
        same += int((race_sample(logits, inv_t, k) == race_sample_torch(logits, inv_t, k)).sum())
        total += args.rows
    report["kernel_vs_torch_same_token_rate"] = same / total
    # Distribution on a small vocabulary through the kernel.
    small = torch.tensor([1.0, -0.5, 2.0, 0.0, 0.7, -2.0, 1.5, 0.3], device=dev)
    n = 200_000
    drawn = race_sample(small.to(torch.bfloat16).repeat(n, 1), torch.full((n,), 1 / args.temperature, device=dev),
                        torch.randint(0, 2**62, (n,), device=dev, generator=gen))
    counts = torch.bincount(drawn, minlength=8).double().cpu().numpy()
    expected = (small.to(torch.bfloat16).float() / args.temperature).softmax(-1).double().cpu().numpy() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    report["small_vocab_chi2_7dof"] = chi2
    report["small_vocab_pass_p001"] = chi2 < 24.32
    report["pass"] = report["small_vocab_pass_p001"] and report["kernel_vs_torch_same_token_rate"] > 0.99
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
