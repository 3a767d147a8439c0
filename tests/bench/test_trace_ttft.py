"""bench/trace_ttft.py on the CPU: every service's trace points, lined up per request, token ids and text in."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmrpc.bench import trace_ttft
from llmrpc.bench.tiny_model import build_tiny_llama
from llmrpc.services import trace


def test_hops_are_medians_of_the_gaps_between_points() -> None:
    points = []
    for i in range(trace_ttft.WARM + 2):
        t = 100.0 * i
        points += [(t, "client: tokens sent"), (t + 0.001, "scheduler: request in"),
                   (t + 0.001 + 0.002 * (i + 1), "client: first message"),
                   (t + 0.5, "scheduler: result in")]  # after the first token: no part of it
    ttft, rows = trace_ttft.hops(points, "tokens")
    names = [name for name, _ in rows]
    assert names == ["scheduler: request in", "client: first message"]
    assert rows[0][1] == pytest.approx(1.0)
    assert ttft == pytest.approx(1.0 + 2.0 * (trace_ttft.WARM + 1.5))  # the timed requests only


def test_the_stack_reports_every_point(tmp_path: Path, default_model_dir: Path, monkeypatch, capsys) -> None:
    model = build_tiny_llama(tmp_path / "tiny", default_model_dir, 4096)
    monkeypatch.setattr(sys, "argv", ["trace_ttft", "--model", str(model), "--device", "cpu", "--load-format", "auto",
                                      "--cuda-graph-max-bs", "0", "--max-running-requests", "4", "--max-context",
                                      "4096", "--tokenizer", str(model), "--requests", "2", "--log-dir", str(tmp_path)])
    trace_ttft.main()
    out = capsys.readouterr().out
    tokens, text = out.split("text in:")
    for point in ("scheduler: request in", "scheduler: admitted", "scheduler: step built", "scheduler: step sent",
                  "worker: step in", "worker: launch", "worker: launched", "worker: tokens on the host",
                  "scheduler: result in", "client: first message"):
        assert point in tokens and point in text, point
    assert "tokenizer: encoded" in text and "tokenizer: " not in tokens
    assert not trace.ENABLED  # this process's own points stay off: only the children were traced
