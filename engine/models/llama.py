"""Llama (and Qwen2, Llama with biases on Q/K/V, and Mistral, Llama as is): the math of one forward pass.

Input is the flat token batch of a step; attention goes through the backend that
was planned for the step, so the model itself knows nothing about pages or rows.
Module names mirror the HF checkpoint; `packed_modules_mapping` says which HF
tensors land in which merged parameter. Each layer's MLP comes from the model
class's `make_mlp`, so a mixture-of-experts model (qwen3_moe.py) swaps it per layer.
"""
from __future__ import annotations

from typing import Callable, Protocol, cast

import torch
from torch import nn

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmrpc.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llmrpc.engine.layers.norm import RMSNorm
from llmrpc.engine.layers.rotary import Rope, RotaryEmbedding
from llmrpc.engine.parallel import TensorParallel
from llmrpc.kernels.base import AttentionBackend


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TensorParallel, qk_norm: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, config.attention_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        config.attention_out_bias, tp)
        # Qwen3 normalizes each head's q and k before RoPE.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, rope: Rope,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention over norm(x + residual), x + residual): the input norm runs inside the QKV projection."""
        qkv, residual = self.qkv_proj.forward_normed(x, residual, norm)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Rotated (Qwen3: each head normalized first), stored and attended, or all in one kernel at a few rows.
        o = attn.rope_forward(q, k, v, self.layer_id, rope, self.q_norm, self.k_norm)
        return self.o_proj(o.flatten(1)), residual


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], config.mlp_bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual), the norm inside the gate_up projection."""
        gate_up, residual = self.gate_up_proj.forward_normed(x, residual, norm)
        return self.down_proj.forward_silu_mul(gate_up), residual


class DecoderMLP(Protocol):
    """What the decoder layer calls on its MLP (LlamaMLP, engine/layers/moe.py's SparseMoeBlock)."""

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]: ...


# Builds layer `layer_id`'s MLP: (config, layer_id, tp) → a module mapping [T, hidden] to [T, hidden] that is a
# DecoderMLP.
MLPFactory = Callable[[ModelConfig, int, TensorParallel], nn.Module]


def dense_mlp(config: ModelConfig, layer_id: int, tp: TensorParallel) -> nn.Module:
    return LlamaMLP(config, tp)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TensorParallel, qk_norm: bool = False,
                 make_mlp: MLPFactory = dense_mlp) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_id, tp, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer_id, tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds the two."""
        x, residual = self.self_attn(x, residual, self.input_layernorm, rope, attn)
        return cast(DecoderMLP, self.mlp).forward_normed(x, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_positions: int, qk_norm: bool = False,
                 make_mlp: MLPFactory = dense_mlp) -> None:
        super().__init__()
        config.check_context(max_positions)  # e.g. a sliding window shorter than the served context
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp, qk_norm, make_mlp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.for_positions(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, attn)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # HF tensor name part → (our merged parameter's name part, shard id for its weight_loader).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp, max_positions, self.qk_norm, self.make_mlp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, config: ModelConfig, layer_id: int, tp: TensorParallel) -> nn.Module:
        return dense_mlp(config, layer_id, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's flat token batch."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
