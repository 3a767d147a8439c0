"""The model registry: HF architecture name (config.json "architectures") → model class."""
from __future__ import annotations

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.models.llama import LlamaForCausalLM
from llmrpc.engine.models.qwen3 import Qwen3ForCausalLM
from llmrpc.engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # attention_bias=True comes from ModelConfig
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # a sliding window is refused by ModelConfig.check_context
}


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(f"architecture {config.architecture!r} is not supported; "
                         f"have {', '.join(MODEL_REGISTRY)}") from None
