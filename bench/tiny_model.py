"""A tiny random Llama with the default model's tokenizer: the model of CPU service tests and benchmarks.

Two layers, hidden 64, 4 heads of 16, 2 KV heads, SmolLM2's 49,152-token vocabulary.
Weights are drawn wide (initializer_range 0.3) so greedy logits are far apart: batching
differently can never flip an argmax through float noise, which lets tests demand
token-identical outputs across schedules.
"""
from __future__ import annotations

from pathlib import Path

VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
DESCRIPTION = "random Llama: 2 layers, hidden 64, 4 heads x 16, 2 KV heads, vocab 49152"


def build_tiny_llama(path: Path, tokenizer_dir: Path, context_length: int) -> Path:
    """Saves the model as safetensors under `path`, with `tokenizer_dir`'s tokenizer files; returns `path`."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            max_position_embeddings=context_length, tie_word_embeddings=True,
                            initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    tf.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return path
