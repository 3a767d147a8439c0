"""Qwen3-MoE and Mistral end to end: greedy decoding through `llmrpc serve` token-identical to transformers.

Each tiny random model carries the default model's tokenizer; prompts of several
lengths go in as token ids at the tokenizer's front door, all at once (they share
batches). The Qwen3-MoE one is served by Hub id out of an HF cache built here in
huggingface_hub's layout, with the Hub switched off (HF_HUB_OFFLINE=1): what a user
who downloaded it once gets.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from llmrpc.bench.tiny_model import TOKENIZER_FILES, VOCAB
from llmrpc.services.local_stack import LocalStack
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.conftest import start_stack
from tests.engine.test_hub import write_hf_cache

# Token prompts of 3 to 40 tokens, ids spread over the vocabulary.
PROMPTS = [[(7919 * i + 13 * j) % VOCAB for j in range(n)] for i, n in enumerate((3, 11, 25, 40))]
NEW_TOKENS = 24
HUB_ID = "llmrpc-test/tiny-qwen3-moe"
REVISION = "3" * 40


def _tiny(kind: str, path: Path, tokenizer_dir: Path) -> Any:
    """A random model of `kind` saved under `path` with the tokenizer files; returns the transformers model."""
    import transformers as tf

    torch.manual_seed(0)
    # Wide weights (as bench/tiny_model.py): greedy logits far apart, so batching never flips an argmax.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8,
                                                         num_experts_per_tok=2, norm_topk_prob=True))
    else:
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return model.float().eval()


def _hf_greedy(model: Any, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()


async def _generate(target: str, prompt: list[int]) -> list[int]:
    async with channel(target) as ch:
        request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
        return [t async for r in generation_pb2_grpc.GenerationStub(ch).Generate(request, timeout=120)
                for t in r.token_ids]


async def _generate_all(target: str) -> tuple[list[list[int]], pb.ModelInfo]:
    async with channel(target) as ch:
        info = await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    return list(await asyncio.gather(*(_generate(target, p) for p in PROMPTS))), info


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An HF cache for the stacks of this module, the Hub switched off."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as mp:  # `llmrpc serve` and its children inherit these
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.mark.parametrize("kind", ["qwen3_moe", "mistral"])
def test_greedy_tokens_are_identical_to_transformers(kind: str, tmp_path: Path, hf_cache: Path,
                                                     default_model_dir: Path) -> None:
    saved = tmp_path / kind
    hf_model = _tiny(kind, saved, default_model_dir)
    expected = [_hf_greedy(hf_model, p) for p in PROMPTS]
    if kind == "qwen3_moe":
        write_hf_cache(hf_cache, HUB_ID, REVISION, {f.name: f.read_bytes() for f in saved.iterdir()})
        model, name, architecture = HUB_ID, HUB_ID, "Qwen3MoeForCausalLM"
    else:
        model, name, architecture = str(saved), kind, "MistralForCausalLM"
    stack: LocalStack = start_stack(tmp_path, model, "--max-total-tokens", "4096")
    try:
        got, info = asyncio.run(_generate_all(stack.tokenizer))
    finally:
        stack.stop()
    assert (info.model_name, info.architecture) == (name, architecture)
    for prompt, tokens, want in zip(PROMPTS, got, expected):
        assert tokens == want, f"{kind}, prompt of {len(prompt)}: stack {tokens} != transformers {want}"
    assert len({t for tokens in got for t in tokens}) > 8  # not a degenerate repeat
