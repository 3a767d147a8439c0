"""The speed ceiling of a workload on one GPU, from the model's shape and two measured rates.

Prefill is charged its matmul FLOPs (2 x parameters x tokens, plus causal
attention) at the measured matmul rate. Decode runs every request at once from
step 0 (256 requests fit the KV pool and the slots), so step t holds the
requests with more than t outputs; a step costs the larger of (all weights + the
KV of every running sequence) over the measured bandwidth and its FLOPs over
the matmul rate. No kernel can beat either term, so
output tokens / (prefill + decode time) is an upper bound for any engine.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np

from llmrpc.engine.config import ModelConfig

BYTES_PER_PARAM = 2  # bf16 weights and KV


@dataclass(frozen=True)
class Shape:
    layer_params: int  # per decoder layer (attention + MLP + norms)
    embed_params: int  # the embedding matrix
    lm_head_params: int  # separate LM head (0 when tied to the embedding)
    kv_bytes_per_token: int
    num_layers: int
    attn_dim: int  # query heads x head_dim

    @property
    def weight_bytes(self) -> int:
        """Bytes a decode step reads: every layer, the LM head (the tied embedding's rows) — not the lookup."""
        head = self.lm_head_params or self.embed_params
        return (self.num_layers * self.layer_params + head) * BYTES_PER_PARAM

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token (the LM head only for sampled tokens: counted separately)."""
        return self.num_layers * self.layer_params


def model_shape(c: ModelConfig) -> Shape:
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.model_type == "qwen3" else 0)
    return Shape(
        layer_params=attn + mlp + norms,
        embed_params=c.vocab_size * c.hidden_size,
        lm_head_params=0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size,
        kv_bytes_per_token=2 * c.num_hidden_layers * kv * BYTES_PER_PARAM,
        num_layers=c.num_hidden_layers,
        attn_dim=q,
    )


def workload_ceiling(config: ModelConfig, prompt_lens: list[int], output_lens: list[int],
                     bandwidth_bytes_s: float, matmul_flops_s: float) -> dict:
    s = model_shape(config)
    head = s.lm_head_params or s.embed_params
    p = np.asarray(prompt_lens, dtype=np.float64)
    o = np.asarray(output_lens, dtype=np.int64)
    # Prefill: every prompt token through the layers, causal attention (QK^T and PV: 4 x dim per pair),
    # one LM head row per request.
    prefill_flops = (2 * s.matmul_params * p.sum() + 2 * s.num_layers * s.attn_dim * (p * (p + 1)).sum()
                     + 2 * head * len(p))
    prefill_s = prefill_flops / matmul_flops_s
    decode_s = 0.0
    # Step t feeds the token sampled at step t-1: requests with more than t + 1 outputs still decode
    # (the first output comes from prefill).
    for t in range(int(o.max()) - 1):
        running = o > t + 1
        b = int(running.sum())
        ctx = p[running] + t + 1
        bytes_ = s.weight_bytes + s.kv_bytes_per_token * ctx.sum()
        flops = 2 * (s.matmul_params + head) * b + 4 * s.num_layers * s.attn_dim * ctx.sum()
        decode_s += max(bytes_ / bandwidth_bytes_s, flops / matmul_flops_s)
    total = prefill_s + decode_s
    return {
        "output_tokens_per_s": float(o.sum() / total),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "bandwidth_GB_s": bandwidth_bytes_s / 1e9,
        "matmul_TFLOP_s": matmul_flops_s / 1e12,
        "shape": asdict(s),
    }


def measure_rates(device: str = "cuda") -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s) measured on `device` now."""
    import torch

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB, far over the L2
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    bandwidth = 2 * src.numel() * src.element_size() / copy_s
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_s = timed(lambda: a @ b, 20)
    return bandwidth, 2 * n ** 3 / mm_s


def main() -> None:
    from llmrpc.bench.workload import offline_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="directory with config.json")
    ap.add_argument("--bandwidth-gb-s", type=float, default=0.0, help="0: measure on the GPU")
    ap.add_argument("--matmul-tflop-s", type=float, default=0.0, help="0: measure on the GPU")
    args = ap.parse_args()
    bw, mm = args.bandwidth_gb_s * 1e9, args.matmul_tflop_s * 1e12
    if not bw or not mm:
        bw, mm = measure_rates()
    w = offline_workload()
    print(json.dumps(workload_ceiling(ModelConfig.load(args.model), [len(p) for p in w.prompts], w.max_tokens,
                                      bw, mm), indent=2))


if __name__ == "__main__":
    main()
