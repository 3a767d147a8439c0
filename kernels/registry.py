"""Attention backends by name; the CLI's choices come from here.

Implementations are named by "module:Class" and imported on first use, so
FlashInfer (or Triton) is only imported by the process that runs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from llmrpc.kernels.base import AttentionBackend

_BACKENDS: dict[str, str] = {
    "torch": "llmrpc.kernels.torch_backend:TorchAttentionBackend",
    "flashinfer": "llmrpc.kernels.flashinfer_backend:FlashInferAttentionBackend",
}
# Packages a backend needs at runtime; `auto` skips a backend whose package is missing.
_REQUIRES: dict[str, str] = {"flashinfer": "flashinfer"}


def register_attention_backend(name: str, target: str, requires: str | None = None) -> None:
    """Adds a backend: `target` is "module:Class", `requires` the package it imports."""
    _BACKENDS[name] = target
    if requires:
        _REQUIRES[name] = requires


def attention_backend_names() -> tuple[str, ...]:
    return ("auto", *_BACKENDS)


def _available(name: str) -> bool:
    package = _REQUIRES.get(name)
    return name in _BACKENDS and (package is None or importlib.util.find_spec(package) is not None)


def resolve_attention_backend(name: str, device: str) -> str:
    """`auto` → flashinfer on CUDA when it is registered and importable, else torch."""
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; have {', '.join(_BACKENDS)}")
        return name
    if device.startswith("cuda") and _available("flashinfer"):
        return "flashinfer"
    return "torch"


def create_attention_backend(name: str, device: str, **kwargs: Any) -> AttentionBackend:
    """The backend `name` (after resolving auto), constructed with `kwargs`."""
    module_name, class_name = _BACKENDS[resolve_attention_backend(name, device)].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
