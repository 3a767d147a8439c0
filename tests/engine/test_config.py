"""ModelConfig: every config.json field that changes the math is honoured or refused, naming the field."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from llmrpc.engine.config import EngineConfig, ModelConfig
from llmrpc.engine.runner import ModelRunner

BASE: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 256}
MOE: dict[str, Any] = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                       "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (silu only)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling: rope type 'yarn' is not supported (have default, linear, llama3)"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters: rope type 'dynamic' is not supported"),
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": None}},
     "rope_scaling.low_freq_factor is required by rope type 'llama3'"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor is required by rope type 'linear'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported (only 1.0)"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 is not supported"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types ['chunked_attention'] are not"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"hidden_size": 30}, "head_dim is not set and hidden_size 30 does not split over 4 heads"),
])
def test_unsupported_fields_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.from_hf({**BASE, **change})


@pytest.mark.parametrize("change,message", [
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok must be a positive integer"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 exceeds num_experts 8"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size: shared experts"),
])
def test_moe_fields_are_checked(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.from_hf({**MOE, **change})


def test_fields_that_change_the_math_are_read() -> None:
    llama = ModelConfig.from_hf({**BASE, "rope_scaling": LLAMA3, "attention_bias": True, "mlp_bias": True,
                                 "head_dim": 16, "tie_word_embeddings": True})
    assert llama.rope_scaling == LLAMA3 and llama.head_dim == 16 and llama.tie_word_embeddings
    assert llama.attention_bias and llama.attention_out_bias and llama.mlp_bias
    # Qwen2: q/k/v biases whatever attention_bias says, never an o_proj bias (as transformers builds it).
    qwen2 = ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "attention_bias": False})
    assert qwen2.attention_bias and not qwen2.attention_out_bias and qwen2.head_dim == 8
    # transformers 5 saves num_experts as num_local_experts.
    moe = ModelConfig.from_hf({**{k: v for k, v in MOE.items() if k != "num_experts"}, "num_local_experts": 8,
                               "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert moe.moe is not None and moe.moe.num_experts == 8 and moe.moe.norm_topk_prob
    assert [moe.moe.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    assert ModelConfig.from_hf(BASE).moe is None


def test_moe_layers_are_sparse_exactly_where_transformers_puts_experts() -> None:
    import transformers as tf

    from llmrpc.engine.layers.moe import SparseMoeBlock
    from llmrpc.engine.models.qwen3_moe import Qwen3MoeForCausalLM
    from llmrpc.engine.parallel import TensorParallel

    for step, mlp_only in ((1, []), (2, []), (1, [0, 2]), (3, [2])):
        hf_config = tf.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=5,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                      decoder_sparse_step=step, mlp_only_layers=mlp_only)
        hf = tf.Qwen3MoeForCausalLM(hf_config)
        config = ModelConfig.from_hf({**hf_config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]})
        ours = Qwen3MoeForCausalLM(config, TensorParallel(), 16)
        hf_sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
        assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers] == hf_sparse, (step, mlp_only)


@pytest.mark.parametrize("config,window", [
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, 4096),  # Mistral-7B-v0.1
    ({"architectures": ["MistralForCausalLM"], "sliding_window": None}, None),  # v0.3
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False}, None),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 128, "use_sliding_window": True,
      "max_window_layers": 1}, 128),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 128, "use_sliding_window": True,
      "max_window_layers": 2}, None),  # no layer index reaches max_window_layers
    ({"sliding_window": 128, "layer_types": ["full_attention", "full_attention"]}, None),
    ({"sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"]}, 128),
])
def test_the_sliding_window_that_attention_really_uses(config: dict[str, Any], window: int | None) -> None:
    assert ModelConfig.from_hf({**BASE, **config}).sliding_window == window


def test_a_sliding_window_shorter_than_the_served_context_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["MistralForCausalLM"],
                                                      "model_type": "mistral", "sliding_window": 64}))

    def load(max_context: int | None) -> ModelRunner:
        return ModelRunner(EngineConfig(model_path=str(tmp_path), load_format="dummy", page_size=4,
                                        max_total_tokens=64, max_slots=2, max_context=max_context))

    with pytest.raises(ValueError, match="sliding_window 64 in config.json is smaller than the served context "
                                         "of 256 tokens, and llmrpc's attention backends have no sliding-window "
                                         "attention: serve at most 64 tokens of context"):
        load(None)  # the model's max_position_embeddings
    with pytest.raises(ValueError, match="served context of 65 tokens"):
        load(65)
    # Within the window, full attention is the same math: served.
    assert load(64).info.context_length == 64
