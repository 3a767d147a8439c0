"""The default model: fetched and converted once, reused after, redone when a conversion was cut short."""
from __future__ import annotations

import json
import time
from pathlib import Path

from llmrpc.engine.default_model import COMPLETE_MARKER, DEFAULT_MODEL_NAME, ensure_default_gguf, ensure_default_model


def test_converted_directory_is_a_complete_hf_model(default_model_dir: Path) -> None:
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    assert (default_model_dir / COMPLETE_MARKER).exists()
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert json.loads((default_model_dir / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert (default_model_dir / "tokenizer.json").stat().st_size > 1_000_000
    assert (default_model_dir / "model.safetensors").stat().st_size > 500_000_000  # float32


def test_warm_call_reuses_the_conversion(default_model_dir: Path) -> None:
    started = time.monotonic()
    assert ensure_default_model(default_model_dir.parent, show_progress=False) == default_model_dir
    assert time.monotonic() - started < 0.5


def test_interrupted_conversion_is_redone(default_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # A cache that already holds the download, and a conversion that stopped half way.
    (tmp_path / "downloads").mkdir()
    gguf = ensure_default_gguf(default_model_dir.parent)
    (tmp_path / "downloads" / gguf.name).symlink_to(gguf)
    half_done = tmp_path / DEFAULT_MODEL_NAME
    half_done.mkdir()
    (half_done / "config.json").write_text("{")
    model_dir = ensure_default_model(tmp_path, show_progress=False)
    assert model_dir == half_done and (model_dir / COMPLETE_MARKER).exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).read_bytes() == (default_model_dir / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_MODEL_NAME, "downloads"]  # no temp dirs left
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
