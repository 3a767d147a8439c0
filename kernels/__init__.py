"""Compute backends behind one small interface: attention over the paged KV cache.

`base.py` defines the interface and the per-step metadata, `registry.py` maps
backend names to implementations (imported lazily, so a missing FlashInfer costs
nothing), `torch_backend.py` is the plain PyTorch backend used on the CPU and
anywhere a faster one is missing.
"""
from __future__ import annotations

from llmrpc.kernels.base import AttentionBackend, AttentionMetadata
from llmrpc.kernels.registry import (
    attention_backend_names,
    create_attention_backend,
    register_attention_backend,
    resolve_attention_backend,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "attention_backend_names",
    "create_attention_backend",
    "register_attention_backend",
    "resolve_attention_backend",
]
