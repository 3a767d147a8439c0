"""Fills a model's parameters: from safetensors in HF layout, from a GGUF file, or at random.

Each checkpoint tensor goes to the parameter that owns it through that
parameter's `weight_loader`, which cuts this rank's tensor-parallel slice; tensors
the model merges (q/k/v, gate/up) are routed by the model's
`packed_modules_mapping`, and a mixture-of-experts model's per-expert tensors
(`...experts.<e>.<proj>.weight`) into its stacked expert parameters by its
`expert_modules_mapping`. Every parameter must be filled, or loading fails.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from llmrpc.engine.layers.linear import default_weight_loader

# HF checkpoints carry these, but the engine computes them itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_TENSOR = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


def resolve_load_format(model_path: str | Path, load_format: str = "auto") -> str:
    if load_format != "auto":
        return load_format
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and any(path.glob("*.safetensors")):
        return "safetensors"
    raise FileNotFoundError(f"{path}: no .safetensors files and not a .gguf file")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def safetensors_tensors(model_dir: Path) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(tensor count, iterator over (name, CPU tensor)) across the checkpoint's shards."""
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    count = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            count += len(list(sf.keys()))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)

    return count, tensors()


def load_weight(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> str | None:
    """Routes one checkpoint tensor into its parameter; returns the parameter's name (None if skipped)."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return None  # the LM head is the embedding
    expert = _EXPERT_TENSOR.match(name)
    experts_mapping: dict[str, tuple[str, int]] = getattr(model, "expert_modules_mapping", {})
    if expert is not None and expert["part"] in experts_mapping:
        our_part, part = experts_mapping[expert["part"]]
        target = f"{expert['prefix']}.{our_part}"
        param = params.get(target)
        if param is None:
            raise KeyError(f"checkpoint tensor {name} has no parameter {target} in the model")
        shard_id = (int(expert["expert"]), part)
        param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]  # the layer set it
        return f"{target}#{shard_id}"
    for hf_part, (our_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{hf_part}." in name:
            target = name.replace(f".{hf_part}.", f".{our_part}.")
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name} has no parameter {target} in the model")
            param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]  # the layer set it
            return f"{target}#{shard_id}"
    param = params.get(name)
    if param is None:
        raise KeyError(f"checkpoint tensor {name} has no parameter in the model")
    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
    return name


def _expected_loads(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, set[str]]:
    """Per parameter, what a complete checkpoint fills: the whole tensor, or every shard of a merged one.

    A parameter may list its shards itself (`shard_ids`, e.g. one per expert and projection).
    """
    merged: dict[str, list[object]] = {}
    for our_part, shard_id in getattr(model, "packed_modules_mapping", {}).values():
        merged.setdefault(our_part, []).append(shard_id)
    expected = {}
    for name, param in params.items():
        part = name.split(".")[-2] if "." in name else ""
        shards = getattr(param, "shard_ids", None) or merged.get(part)
        expected[name] = {f"{name}#{s}" for s in shards} if shards else {name}
    return expected


def load_checkpoint(model: nn.Module, model_path: str | Path, load_format: str, show_progress: bool = True) -> None:
    """Loads safetensors or GGUF weights into `model` (already on its device, in its dtype)."""
    path = Path(model_path)
    if load_format == "gguf":
        from llmrpc.engine.gguf import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(path)
        count, tensors = len(checkpoint), checkpoint.tensors()
    elif load_format == "safetensors":
        count, tensors = safetensors_tensors(path)
    else:
        raise ValueError(f"load_checkpoint: unknown load format {load_format!r}")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in tqdm(tensors, total=count, desc=f"loading {path.name}", unit="tensor",
                             disable=not show_progress, leave=False):
        key = load_weight(model, params, name, tensor)
        if key is not None:
            loaded.add(key)
    # A parameter loaded whole (e.g. stacked experts in transformers 5's layout) needs none of its shards.
    missing = {key for name, keys in _expected_loads(model, params).items() if name not in loaded
               for key in keys - loaded}
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights, the same for the same seed: norms at 1, everything else N(0, 0.02)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def load_model_weights(model: nn.Module, model_path: str | Path, load_format: str = "auto", seed: int = 0,
                       show_progress: bool = True) -> str:
    """Fills `model` by `load_format` (auto: from the path); returns the format used."""
    fmt = resolve_load_format(model_path, load_format)
    if fmt == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_checkpoint(model, model_path, fmt, show_progress)
    return fmt
