"""GGUF files read as HF checkpoints: metadata → config.json dicts, tensors → HF names, dequantized.

llama.cpp renames every tensor (blk.N.attn_q.weight for
model.layers.N.self_attn.q_proj.weight), quantizes most of them, and, for the
llama architecture only, permutes the rows of Q and K to its interleaved RoPE
layout; reading undoes all three so the rest of the engine sees an HF model.
Mistral files are llama files. A Qwen3-MoE file stacks each layer's experts
(blk.N.ffn_gate_exps.weight is [experts, moe_intermediate, hidden]); they are
read back as the HF checkpoint's one tensor per expert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen3moe": "Qwen3MoeForCausalLM"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
}
# Stacked expert tensors → the per-expert HF tensor name (format it with the expert id).
_EXPERT_NAMES = {"ffn_gate_exps": "mlp.experts.{}.gate_proj", "ffn_up_exps": "mlp.experts.{}.up_proj",
                 "ffn_down_exps": "mlp.experts.{}.down_proj"}
# Tensors with nothing to load: RoPE frequencies are recomputed from the config.
_SKIPPED = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight → model.layers.3.self_attn.q_proj.weight."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K permutation: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    dim = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32; the shortest decimal that round-trips recovers e.g. 1e-05.
    return float(str(np.float32(value)))


class GGUFCheckpoint:
    """One `.gguf` file; the reader memory-maps it, so opening is cheap."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))
        self.arch = self.field("general.architecture")
        if self.arch not in _ARCHITECTURES:
            raise ValueError(f"{self.path.name}: GGUF architecture {self.arch!r} is not supported; "
                             f"have {', '.join(_ARCHITECTURES)}")

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """The config.json an HF checkpoint of this model would carry."""
        hidden = int(self._arch_field("embedding_length"))
        heads = int(self._arch_field("attention.head_count"))
        vocab = self._arch_field("vocab_size")
        if vocab is None:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "hidden_act": "silu",
            "hidden_size": hidden,
            # A Qwen3-MoE file whose every layer is sparse may carry only the experts' width.
            "intermediate_size": int(self._arch_field("feed_forward_length",
                                                      self._arch_field("expert_feed_forward_length"))),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch_field("attention.head_count_kv", heads)),
            "head_dim": int(self._arch_field("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(self._arch_field("context_length")),
            "rms_norm_eps": _float32_value(self._arch_field("attention.layer_norm_rms_epsilon")),
            "rope_theta": _float32_value(self._arch_field("rope.freq_base", 10000.0)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": all(t.name != "output.weight" for t in self.reader.tensors),
            "attention_bias": any(t.name.endswith("attn_q.bias") for t in self.reader.tensors),
            "torch_dtype": "float32",
        }
        window = self._arch_field("attention.sliding_window")
        if window is not None:
            config["sliding_window"] = int(window)
        if self.arch == "qwen3moe":
            config.update(self._moe_config(int(config["num_hidden_layers"])))
        if self._arch_field("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear",
                                      "factor": _float32_value(self._arch_field("rope.scaling.factor"))}
        for gguf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                              ("padding_token_id", "pad_token_id")):
            value = self.field(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                config[key] = int(value)
        return config

    def _moe_config(self, num_layers: int) -> dict[str, Any]:
        routed = {int(t.name.split(".")[1]) for t in self.reader.tensors if t.name.endswith("ffn_gate_inp.weight")}
        return {
            "num_experts": int(self._arch_field("expert_count")),
            "num_experts_per_tok": int(self._arch_field("expert_used_count")),
            "moe_intermediate_size": int(self._arch_field("expert_feed_forward_length")),
            # llama.cpp always renormalizes Qwen3-MoE's top-k weights; a file may say so explicitly.
            "norm_topk_prob": bool(self._arch_field("expert_weights_norm", True)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(num_layers) if i not in routed],
        }

    def hf_generation_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.hf_config().items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    def __len__(self) -> int:
        """How many HF tensors `tensors()` yields (a stacked expert tensor counts once per expert)."""
        # GGUF lists dims innermost first: a stacked tensor's expert count is its last.
        return sum(int(t.shape[-1]) if _is_stacked_experts(t.name) else 1
                   for t in self.reader.tensors if t.name not in _SKIPPED)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every weight, dequantized one at a time."""
        from gguf.quants import dequantize

        heads = int(self._arch_field("attention.head_count"))
        kv_heads = int(self._arch_field("attention.head_count_kv", heads))
        for t in self.reader.tensors:
            if t.name in _SKIPPED:
                continue
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            weight = dequantize(t.data, t.tensor_type).reshape(shape)
            if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                weight = unpermute_rope_rows(weight, heads if ".attn_q." in t.name else kv_heads)
            if _is_stacked_experts(t.name):
                _, layer, kind, suffix = t.name.split(".")
                for expert, expert_weight in enumerate(weight):
                    yield f"model.layers.{layer}.{_EXPERT_NAMES[kind].format(expert)}.{suffix}", _tensor(expert_weight)
                continue
            yield hf_tensor_name(t.name), _tensor(weight)


def _is_stacked_experts(gguf_name: str) -> bool:
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _EXPERT_NAMES


def _tensor(weight: np.ndarray) -> torch.Tensor:
    # A float32 copy: unquantized tensors come back as read-only views of the memory map.
    return torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))
