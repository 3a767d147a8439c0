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

# The architectures whose HF config.json we understand; the model registry maps each to a class.
_DEFAULT_ATTENTION_BIAS = {"Qwen2ForCausalLM": True}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class EngineConfig:
    """How one worker rank runs its model."""

    model_path: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    page_size: int = 16
    max_total_tokens: int | None = None  # caps the KV pool at this many tokens
    kv_memory_fraction: float = 0.85  # of the GPU memory still free after the weights
    max_slots: int = 256
    max_context: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"  # auto: flashinfer on CUDA when importable, else torch
    cuda_graph_max_bs: int = 256  # decode steps up to this many rows replay CUDA graphs; 0: always eager
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
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.is_cuda else "float32"


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
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = ""

    @classmethod
    def from_hf(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None,
                name: str = "") -> ModelConfig:
        """From the dicts of config.json and generation_config.json (transformers 4 or 5 layout)."""
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config.json names no architecture")
        architecture = architectures[0]
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (silu only)")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported (have {', '.join(_SUPPORTED_ROPE_TYPES)})")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos: list[int] = []
        for source in (generation_config or {}, config):
            ids = source.get("eos_token_id")
            for i in [ids] if isinstance(ids, int) else (ids or []):
                if i not in eos:
                    eos.append(int(i))
        return cls(
            architecture=architecture,
            model_type=config.get("model_type", ""),
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", _DEFAULT_ATTENTION_BIAS.get(architecture, False))),
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
        return cls.from_hf(json.loads(config_file.read_text()), generation, name=path.name)
