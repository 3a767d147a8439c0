"""Typed configuration of the engine: what to run (EngineConfig) and the model's shape (ModelConfig).

EngineConfig is built once by the CLI and passed down unchanged. ModelConfig is read
from the model itself: an HF directory's config.json (+ generation_config.json) or a
GGUF file's metadata, so every later component sizes itself from one frozen object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What config.json leaves implicit, per architecture.
_ALWAYS_QKV_BIAS = ("Qwen2ForCausalLM",)  # transformers' Qwen2: q/k/v biases whatever attention_bias says ...
_NO_OUT_BIAS = ("Qwen2ForCausalLM",)  # ... and never an o_proj bias
_MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# --kv-cache-dtype: auto stores K/V in the model dtype; fp8_e4m3 in torch.float8_e4m3fn, half of bf16's bytes.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
_KV_CACHE_TORCH_NAMES = {"fp8_e4m3": "float8_e4m3fn"}
# --flashinfer-prefill: which of FlashInfer's kernel families runs prefill attention. auto: fa3 (FlashAttention-3's
# Hopper kernels) on an sm90 GPU with a 16-bit KV cache, fa2 elsewhere (an FP8 pool is read by fa2's kernels).
FLASHINFER_PREFILL = ("auto", "fa2", "fa3")
# --flashinfer-decode: FlashInfer's decode kernels on tensor cores or CUDA cores. auto: tensor cores, the faster
# over the offline workload on Qwen3-0.6B and for the kernel alone on Qwen3-8B (kernels/flashinfer_backend.py).
FLASHINFER_DECODE = ("auto", "tensor-cores", "cuda-cores")


@dataclass(frozen=True)
class EngineConfig:
    """How one worker rank runs its model."""

    model_path: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: auto is the model dtype
    page_size: int = 16
    max_total_tokens: int | None = None  # caps the KV pool at this many tokens
    kv_memory_fraction: float = 0.85  # of the GPU memory still free after the weights
    max_slots: int = 256
    max_context: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"  # auto: flashinfer on CUDA when importable, else torch
    flashinfer_prefill: str = "auto"  # FLASHINFER_PREFILL: FlashInfer's prefill kernels (auto: fa3 on Hopper)
    flashinfer_decode: str = "auto"  # FLASHINFER_DECODE: FlashInfer's decode kernels (auto: tensor cores)
    cuda_graph_max_bs: int = 256  # decode steps up to this many rows replay CUDA graphs; 0: always eager
    prefill_graph_max_tokens: int = 4096  # prefill steps up to this many tokens replay piecewise graphs; 0: eager
    gemv_max_rows: int = 2  # CUDA linears of up to this many rows run the fused Triton GEMV; 0: cuBLAS always
    fused_decode_max_rows: int = 2  # graphed decode steps of up to this many rows: one Triton attention kernel
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    seed: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    dist_init_addr: str | None = None  # host:port where rank 0 hosts the ranks' rendezvous (tp_size > 1)

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside tp_size {self.tp_size}")
        if self.tp_size > 1:
            host, _, port = (self.dist_init_addr or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"tp_size {self.tp_size} needs dist_init_addr as host:port, "
                                 f"got {self.dist_init_addr!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.cuda_graph_max_bs < 0:
            raise ValueError(f"cuda_graph_max_bs must be >= 0, got {self.cuda_graph_max_bs}")
        if self.prefill_graph_max_tokens < 0:
            raise ValueError(f"prefill_graph_max_tokens must be >= 0, got {self.prefill_graph_max_tokens}")
        from llmrpc.kernels import triton_decode, triton_gemv

        if not 0 <= self.gemv_max_rows <= triton_gemv.MAX_ROWS:
            raise ValueError(f"gemv_max_rows (--gemv-max-rows) must be in [0, {triton_gemv.MAX_ROWS}], "
                             f"got {self.gemv_max_rows}")
        if not 0 <= self.fused_decode_max_rows <= triton_decode.MAX_ROWS:
            raise ValueError(f"fused_decode_max_rows (--fused-decode-max-rows) must be in "
                             f"[0, {triton_decode.MAX_ROWS}], got {self.fused_decode_max_rows}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.flashinfer_prefill not in FLASHINFER_PREFILL:
            raise ValueError(f"flashinfer_prefill (--flashinfer-prefill) must be one of {', '.join(FLASHINFER_PREFILL)}, "
                             f"got {self.flashinfer_prefill!r}")
        if self.flashinfer_prefill == "fa3" and self.kv_cache_dtype != "auto":
            raise ValueError(f"flashinfer_prefill (--flashinfer-prefill) fa3 reads a 16-bit KV cache only, not "
                             f"kv_cache_dtype (--kv-cache-dtype) {self.kv_cache_dtype}: use fa2 or auto")
        if self.flashinfer_decode not in FLASHINFER_DECODE:
            raise ValueError(f"flashinfer_decode (--flashinfer-decode) must be one of {', '.join(FLASHINFER_DECODE)}, "
                             f"got {self.flashinfer_decode!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype (--kv-cache-dtype) must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.is_cuda else "float32"

    @property
    def kv_cache_dtype_name(self) -> str:
        """The torch dtype (by name) the KV pages are stored in."""
        return _KV_CACHE_TORCH_NAMES.get(self.kv_cache_dtype, self.torch_dtype_name)


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts MLP of Qwen3-MoE: a router picks `num_experts_per_tok` of `num_experts` per token."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False  # renormalize the chosen experts' router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not listed here (those keep a dense MLP)

    def is_sparse(self, layer_id: int) -> bool:
        return layer_id not in self.mlp_only_layers and (layer_id + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, in HF config.json terms."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k and v
    attention_out_bias: bool = False  # a bias on o_proj (Llama and Qwen3 tie it to attention_bias; Qwen2 has none)
    mlp_bias: bool = False
    sliding_window: int | None = None  # the window attention really uses (None: full attention everywhere)
    moe: MoEConfig | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = ""

    @classmethod
    def from_hf(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None,
                name: str = "") -> ModelConfig:
        """From the dicts of config.json and generation_config.json (transformers 4 or 5 layout).

        Every field that changes the math is either honoured or refused here, naming the field.
        """
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config.json names no architecture")
        architecture = architectures[0]
        _refuse_unsupported(config)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
        if not config.get("head_dim") and hidden % heads:
            raise ValueError(f"head_dim is not set and hidden_size {hidden} does not split over {heads} heads")
        rope_theta, rope_scaling = _rope(config)
        eos: list[int] = []
        for source in (generation_config or {}, config):
            ids = source.get("eos_token_id")
            for i in [ids] if isinstance(ids, int) else (ids or []):
                if i not in eos:
                    eos.append(int(i))
        attention_bias = architecture in _ALWAYS_QKV_BIAS or bool(config.get("attention_bias", False))
        return cls(
            architecture=architecture,
            model_type=config.get("model_type", ""),
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_out_bias=attention_bias and architecture not in _NO_OUT_BIAS,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=_sliding_window(config),
            moe=_moe(config) if architecture in _MOE_ARCHITECTURES else None,
            eos_token_ids=tuple(eos),
            bos_token_id=config.get("bos_token_id"),
            name=name,
        )

    @classmethod
    def load(cls, model_path: str | Path) -> ModelConfig:
        """From an HF directory (config.json, generation_config.json) or a `.gguf` file's metadata."""
        path = Path(model_path)
        if path.is_file() and path.suffix == ".gguf":
            from llmrpc.engine.gguf import GGUFCheckpoint

            checkpoint = GGUFCheckpoint(path)
            return cls.from_hf(checkpoint.hf_config(), checkpoint.hf_generation_config(), name=path.stem)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path}: no config.json (expected an HF model directory or a .gguf file)")
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.exists() else None
        from llmrpc.engine.hub import model_name

        return cls.from_hf(json.loads(config_file.read_text()), generation, name=model_name(path))

    def check_context(self, max_context: int) -> None:
        """Refuses to serve `max_context` tokens where the math would differ from the model's.

        No attention backend implements a sliding window, so a window smaller than the served
        context would silently become full attention: refused, naming the field.
        """
        if self.sliding_window is not None and self.sliding_window < max_context:
            raise ValueError(
                f"sliding_window {self.sliding_window} in config.json is smaller than the served context of "
                f"{max_context} tokens, and llmrpc's attention backends have no sliding-window attention: "
                f"serve at most {self.sliding_window} tokens of context (max_context) or a model without one")


# Fields whose non-default values change the math and that no model here implements.
_UNSUPPORTED_VALUES: dict[str, Any] = {
    "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_REQUIRED = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _refuse_unsupported(config: dict[str, Any]) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (silu only)")
    for key, default in _UNSUPPORTED_VALUES.items():
        value = config.get(key, default)
        if value is not None and value != default:
            raise ValueError(f"{key} {value!r} is not supported (only {default!r})")
    unknown = set(config.get("layer_types") or ()) - set(_LAYER_TYPES)
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported (have {', '.join(_LAYER_TYPES)})")


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the scaling dict or None for plain RoPE); an unknown or incomplete scaling is refused."""
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = dict(config.get(field) or {})
    rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{field}: rope type {rope_type!r} is not supported (have {', '.join(_SUPPORTED_ROPE_TYPES)})")
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if rope.get(key) is None:
            raise ValueError(f"{field}.{key} is required by rope type {rope_type!r}")
    return rope_theta, None if rope_type == "default" else {**rope, "rope_type": rope_type}


def _sliding_window(config: dict[str, Any]) -> int | None:
    """The window some layer really attends within, or None when every layer attends to everything."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if "use_sliding_window" in config and not config["use_sliding_window"]:
        return None  # Qwen2/Qwen3 carry a window that is off unless use_sliding_window
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if layer_types is None and config.get("use_sliding_window"):
        # Qwen2 layout: layers from max_window_layers on slide.
        if int(config.get("max_window_layers", 0)) >= int(config["num_hidden_layers"]):
            return None
    return int(window)


def _moe(config: dict[str, Any]) -> MoEConfig:
    # transformers 5 saves num_experts as num_local_experts (its attribute map); checkpoints say num_experts.
    sizes: dict[str, int] = {}
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        value = config.get(key, config.get("num_local_experts") if key == "num_experts" else None)
        if not value or int(value) < 1:
            raise ValueError(f"{key} must be a positive integer for a mixture-of-experts model, got {value!r}")
        sizes[key] = int(value)
    moe = MoEConfig(
        num_experts=sizes["num_experts"],
        num_experts_per_tok=sizes["num_experts_per_tok"],
        moe_intermediate_size=sizes["moe_intermediate_size"],
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        decoder_sparse_step=int(config.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in config.get("mlp_only_layers") or ()),
    )
    if moe.num_experts_per_tok > moe.num_experts:
        raise ValueError(f"num_experts_per_tok {moe.num_experts_per_tok} exceeds num_experts {moe.num_experts}")
    if config.get("shared_expert_intermediate_size"):
        raise ValueError("shared_expert_intermediate_size: shared experts are not supported")
    return moe
