"""The speed ceiling of a workload on one GPU, from the model's shape and two measured rates.

Prefill is charged its matmul FLOPs (2 x parameters multiplied per token x tokens,
plus causal attention) at the measured matmul rate. Decode runs every request at
once from step 0 (256 requests fit the KV pool and the slots), so step t holds
the requests with more than t outputs; a step costs the larger of (the weights
it reads + the KV of every running sequence) over the measured bandwidth and its
FLOPs over the matmul rate. No kernel can beat either term, so output tokens /
(prefill + decode time) is an upper bound for any engine.

A mixture-of-experts layer multiplies each token by its k experts only, and a
decode step of B rows reads only the experts its rows were routed to: with
uniform routing, E * (1 - (1 - k/E)^B) of the E experts in expectation (8 of
128 at B = 1, about 126 at B = 64), not all of them.

`latency_ceiling` bounds bench/latency.py's two measurements the same way:
single-stream decode (128-token prompt, 512 out) and TTFT of a 2,048-token
prompt (the larger of its FLOPs and its weight bytes: a long prompt reads
every expert once).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np

from llmrpc.engine.config import ModelConfig

BYTES_PER_PARAM = 2  # bf16 weights and KV
DECODE_PROMPT, DECODE_TOKENS, TTFT_PROMPT = 128, 512, 2048  # bench/latency.py's measurements


@dataclass(frozen=True)
class Shape:
    dense_params: int  # all layers' parameters every token multiplies: attention, norms, dense MLPs, routers
    embed_params: int  # the embedding matrix
    lm_head_params: int  # separate LM head (0 when tied to the embedding)
    kv_bytes_per_token: int
    num_layers: int
    attn_dim: int  # query heads x head_dim
    expert_params: int = 0  # one expert of one sparse layer (gate, up and down)
    num_sparse_layers: int = 0
    num_experts: int = 0
    experts_per_token: int = 0

    def experts_read(self, batch: float) -> float:
        """Expected distinct experts per sparse layer that `batch` tokens are routed to (uniform routing)."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.experts_per_token / self.num_experts) ** batch)

    def weight_bytes(self, batch: float) -> float:
        """Bytes a step of `batch` tokens reads: the dense layers, the experts it routes to, the LM head
        (the tied embedding's rows) — not the embedding lookup."""
        head = self.lm_head_params or self.embed_params
        experts = self.num_sparse_layers * self.experts_read(batch) * self.expert_params
        return (self.dense_params + experts + head) * BYTES_PER_PARAM

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token (the LM head only for sampled tokens: counted separately)."""
        return self.dense_params + self.num_sparse_layers * self.experts_per_token * self.expert_params


def model_shape(c: ModelConfig) -> Shape:
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.model_type in ("qwen3", "qwen3_moe") else 0)
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    sparse = [i for i in range(c.num_hidden_layers) if c.moe is not None and c.moe.is_sparse(i)]
    router = c.moe.num_experts * c.hidden_size if c.moe is not None else 0
    return Shape(
        dense_params=(c.num_hidden_layers * (attn + norms) + (c.num_hidden_layers - len(sparse)) * dense_mlp
                      + len(sparse) * router),
        embed_params=c.vocab_size * c.hidden_size,
        lm_head_params=0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size,
        kv_bytes_per_token=2 * c.num_hidden_layers * kv * BYTES_PER_PARAM,
        num_layers=c.num_hidden_layers,
        attn_dim=q,
        expert_params=3 * c.hidden_size * c.moe.moe_intermediate_size if c.moe is not None else 0,
        num_sparse_layers=len(sparse),
        num_experts=c.moe.num_experts if c.moe is not None else 0,
        experts_per_token=c.moe.num_experts_per_tok if c.moe is not None else 0,
    )


def _decode_step_s(s: Shape, ctx: np.ndarray, bandwidth_bytes_s: float, matmul_flops_s: float) -> float:
    """One decode step of len(ctx) rows whose sequences hold ctx tokens of KV each."""
    head = s.lm_head_params or s.embed_params
    b = len(ctx)
    bytes_ = s.weight_bytes(b) + s.kv_bytes_per_token * ctx.sum()
    flops = 2 * (s.matmul_params + head) * b + 4 * s.num_layers * s.attn_dim * ctx.sum()
    return max(bytes_ / bandwidth_bytes_s, flops / matmul_flops_s)


def _prefill_flops(s: Shape, prompt_lens: np.ndarray) -> float:
    """Every prompt token through the layers, causal attention (QK^T and PV: 4 x dim per pair),
    one LM head row per prompt."""
    head = s.lm_head_params or s.embed_params
    p = prompt_lens
    return (2 * s.matmul_params * p.sum() + 2 * s.num_layers * s.attn_dim * (p * (p + 1)).sum()
            + 2 * head * len(p))


def workload_ceiling(config: ModelConfig, prompt_lens: list[int], output_lens: list[int],
                     bandwidth_bytes_s: float, matmul_flops_s: float) -> dict:
    s = model_shape(config)
    p = np.asarray(prompt_lens, dtype=np.float64)
    o = np.asarray(output_lens, dtype=np.int64)
    prefill_s = _prefill_flops(s, p) / matmul_flops_s
    decode_s = 0.0
    # Step t feeds the token sampled at step t-1: requests with more than t + 1 outputs still decode
    # (the first output comes from prefill).
    for t in range(int(o.max()) - 1):
        running = o > t + 1
        decode_s += _decode_step_s(s, p[running] + t + 1, bandwidth_bytes_s, matmul_flops_s)
    total = prefill_s + decode_s
    return {
        "output_tokens_per_s": float(o.sum() / total),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "bandwidth_GB_s": bandwidth_bytes_s / 1e9,
        "matmul_TFLOP_s": matmul_flops_s / 1e12,
        "shape": asdict(s),
    }


def latency_ceiling(config: ModelConfig, bandwidth_bytes_s: float, matmul_flops_s: float) -> dict:
    """Upper bounds of bench/latency.py's single-stream decode tok/s and TTFT(2048) in ms."""
    s = model_shape(config)
    steps = [_decode_step_s(s, np.array([DECODE_PROMPT + t + 1.0]), bandwidth_bytes_s, matmul_flops_s)
             for t in range(DECODE_TOKENS - 1)]
    ttft_s = max(_prefill_flops(s, np.array([float(TTFT_PROMPT)])) / matmul_flops_s,
                 s.weight_bytes(TTFT_PROMPT) / bandwidth_bytes_s)
    return {
        "decode_tok_s": (DECODE_TOKENS - 1) / sum(steps),
        "ttft_ms": 1e3 * ttft_s,
        "bandwidth_GB_s": bandwidth_bytes_s / 1e9,
        "matmul_TFLOP_s": matmul_flops_s / 1e12,
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
    config = ModelConfig.load(args.model)
    print(json.dumps({"offline": workload_ceiling(config, [len(p) for p in w.prompts], w.max_tokens, bw, mm),
                      "latency": latency_ceiling(config, bw, mm)}, indent=2))


if __name__ == "__main__":
    main()
