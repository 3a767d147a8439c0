"""bench/latency.py's engine part (services/llm.py's LLM, token arrivals from LLM.stream) on the CPU."""
from __future__ import annotations

from pathlib import Path

from llmrpc.bench import latency
from llmrpc.bench.tiny_model import build_tiny_llama


def test_engine_latency_times_every_token(tmp_path: Path, default_model_dir: Path) -> None:
    model = build_tiny_llama(tmp_path / "tiny", default_model_dir, 4096)  # TTFT prompts are 2,048 tokens
    args = latency.build_parser().parse_args(["--model", str(model), "--device", "cpu", "--cuda-graph-max-bs", "0",
                                              "--max-running-requests", "4", "--max-context", "4096", "--repeats", "1"])
    m = latency.measure_engine(args)
    assert len(m["decode_all"]) == 1 and m["decode_tok_s"] == m["decode_all"][0] > 0
    assert len(m["ttft_all_ms"]) == 2 and all(t > 0 for t in m["ttft_all_ms"])
    m4 = latency.measure_engine(args, decode_steps=4)  # 4 tokens a step: still every token timed
    assert len(m4["decode_all"]) == 1 and m4["decode_tok_s"] > 0
