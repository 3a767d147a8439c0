"""The model registry: HF architecture name (config.json "architectures") → model class."""
from __future__ import annotations

from torch import nn

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.models.llama import LlamaForCausalLM
from llmrpc.engine.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # attention_bias=True comes from ModelConfig
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"have {', '.join(MODEL_REGISTRY)}") from None
