"""Qwen3: Llama's block with an RMSNorm on every head of q and k, and no Q/K/V bias."""
from __future__ import annotations

from llmrpc.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
