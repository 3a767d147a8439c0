"""bench/latency.py's text system: TTFT through the real tokenizer front of a real stack, on the CPU."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

from llmrpc.bench import latency
from llmrpc.bench.offline import Stack
from llmrpc.bench.tiny_model import build_tiny_llama
from llmrpc.engine.hub import load_tokenizer


def test_texts_encode_to_the_ttft_prompt_length(tmp_path: Path, default_model_dir: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny", default_model_dir, 4096)
    tok = load_tokenizer(model)
    texts = latency._texts(str(model), 3, random.Random(0))
    assert len(set(texts)) == 3
    assert [len(tok.encode(t, add_special_tokens=False)) for t in texts] == [latency.TTFT_PROMPT] * 3


def test_text_ttft_goes_through_the_tokenizer(tmp_path: Path, default_model_dir: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny", default_model_dir, 4096)
    args = latency.build_parser().parse_args(
        ["--model", str(model), "--device", "cpu", "--load-format", "auto", "--cuda-graph-max-bs", "0",
         "--max-running-requests", "4", "--max-context", "4096", "--log-dir", str(tmp_path)])
    stack = Stack(args, tokenizer=str(model))
    try:
        m = asyncio.run(latency.measure_text(stack.text_target, str(model), repeats=1))
    finally:
        stack.close()
    assert len(m["ttft_all_ms"]) == 2 and all(t > 0 for t in m["ttft_all_ms"])
    assert m["prompt_tokens"] == [latency.TTFT_PROMPT]  # the tokenizer's own count of the timed texts
