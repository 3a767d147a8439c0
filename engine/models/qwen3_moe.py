"""Qwen3-MoE: Qwen3's attention, and in its sparse layers a router over experts instead of one MLP.

Which layers are sparse comes from the config (`decoder_sparse_step`,
`mlp_only_layers`); the others keep Qwen3's dense MLP of `intermediate_size`.
HF checkpoints store one tensor per expert and projection
(`mlp.experts.<e>.gate_proj.weight`); `expert_modules_mapping` routes each into
the layer's stacked expert parameters (engine/layers/moe.py).
"""
from __future__ import annotations

from torch import nn

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from llmrpc.engine.models.llama import dense_mlp
from llmrpc.engine.models.qwen3 import Qwen3ForCausalLM
from llmrpc.engine.parallel import TensorParallel


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    # HF per-expert tensor name part → (our stacked parameter, part of it).
    expert_modules_mapping = {"gate_proj": ("gate_up_proj", GATE), "up_proj": ("gate_up_proj", UP),
                              "down_proj": ("down_proj", DOWN)}

    def make_mlp(self, config: ModelConfig, layer_id: int, tp: TensorParallel) -> nn.Module:
        moe = config.moe
        if moe is None or not moe.is_sparse(layer_id):
            return dense_mlp(config, layer_id, tp)
        return SparseMoeBlock(config.hidden_size, moe.num_experts, moe.num_experts_per_tok,
                              moe.moe_intermediate_size, moe.norm_topk_prob, tp)
