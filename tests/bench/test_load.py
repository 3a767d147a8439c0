"""bench/load.py's measuring parts, on made-up timings: trace blocks, per-token ITL, TPOT, goodput, vLLM's keys.

The harness against a real stack (every load mode, a trace with shared hash_ids, duration runs,
the per-request export) is tests/services/test_reliability.py's test_load_harness_closed_and_open_loop.
"""
from __future__ import annotations

import itertools
import json
import random

import pytest

from llmrpc.bench.load import (Job, Outcome, Prompts, Record, _spread, arrivals, parse_goodput, read_trace,
                               summarize)


def test_trace_rows_keep_their_hash_ids_and_start_at_zero(tmp_path) -> None:
    trace = tmp_path / "mooncake.jsonl"
    trace.write_text("\n".join(json.dumps(row) for row in [
        {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]},
        {"timestamp": 27000, "input_length": 10, "output_length": 3},
    ]) + "\n")
    assert read_trace(trace, "ms") == [Job(0.0, 10, 3, ()), Job(pytest.approx(0.482), 6955, 52, (46, 47, 48))]


def test_equal_hash_ids_are_equal_blocks_within_a_level_and_new_ones_across_levels() -> None:
    rng = random.Random(0)
    level = Prompts(vocab=49152, text=False, block_size=16, salt="0:0")
    a = level.build(Job(0, 40, 1, (1, 2, 3)), rng)
    b = level.build(Job(0, 40, 1, (1, 2, 9)), rng)
    assert len(a) == len(b) == 40 and a[:32] == b[:32] and a[32:] != b[32:]
    assert all(100 <= t < 49152 for t in a)
    short = level.build(Job(0, 20, 1, (1, 2, 3)), rng)
    assert short == a[:20]  # a prompt shorter than its blocks is their prefix
    other = Prompts(vocab=49152, text=False, block_size=16, salt="0:1").build(Job(0, 40, 1, (1, 2, 3)), rng)
    assert other[:16] != a[:16]
    words = Prompts(vocab=0, text=True, block_size=4, salt="x")
    x, y = words.build(Job(0, 6, 1, (5, 6)), rng).split(), words.build(Job(0, 6, 1, (5, 7)), rng).split()
    assert len(x) == len(y) == 6 and x[:4] == y[:4]


def test_an_event_of_n_tokens_is_n_gaps() -> None:
    out = Outcome(start=10.0)
    out.take([(10.5, 2), (10.8, 0), (11.1, 3), (11.2, 1)])
    assert out.first_token == 10.5 and out.output_tokens == 6
    assert out.gaps == pytest.approx([0.0, 0.2, 0.2, 0.2, 0.1])  # 5 gaps for 6 tokens
    out.end = 11.5
    assert out.ttft == pytest.approx(0.5) and out.tpot == pytest.approx(1.0 / 5)


def test_unknown_event_sizes_add_up_to_the_reported_total() -> None:
    assert _spread([(1, False)] * 4, 8) == [1, 3, 2, 2]  # 4 missing tokens, round robin after the first
    assert _spread([(2, True), (1, False), (5, True)], 10) == [2, 3, 5]
    assert _spread([(1, False), (1, False), (1, False)], 2) == [1, 1, 1]  # never below one per event


def test_gamma_arrivals_keep_the_mean_rate() -> None:
    rng = random.Random(1)
    for burstiness in (1.0, 0.25):
        times = list(itertools.islice(arrivals(4.0, burstiness, rng), 4001))
        assert times[-1] / 4000 == pytest.approx(0.25, rel=0.1)
    assert list(itertools.islice(arrivals(float("inf"), 1.0, rng), 3)) == [0.0, 0.0, 0.0]


def test_goodput_keys() -> None:
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["itl:5"], ["ttft=5"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def _outcome(start: float, first: float, end: float, tokens: int, status: str = "OK") -> Outcome:
    out = Outcome(status=status, start=start, end=end, cached_tokens=8)
    out.take([(first, 1)] + [(first + (end - first) * k / (tokens - 1), 1) for k in range(1, tokens)])
    return out


def test_summary_in_vllms_keys_with_goodput() -> None:
    records = [Record(Job(0, 32, 5), 0.0, _outcome(0.0, 0.1, 0.5, 5)),  # TTFT 100 ms, TPOT 100 ms
               Record(Job(0, 32, 5), 0.0, _outcome(0.0, 0.4, 0.6, 5)),  # TTFT 400 ms, TPOT 50 ms
               Record(Job(0, 32, 5), 0.0, Outcome(status="UNAVAILABLE", error="worker lost"))]
    s = summarize(records, 2.0, 2, {"ttft": 200.0, "tpot": 120.0}, [50, 99])
    assert (s["num_prompts"], s["completed"], s["failed"], s["errors"]) == (3, 2, 1, ["UNAVAILABLE: worker lost"])
    assert (s["total_input_tokens"], s["total_output_tokens"], s["expected_output_tokens"]) == (64, 10, 15)
    assert s["request_throughput"] == 1.0 and s["request_goodput"] == 0.5  # only the first meets both SLOs
    assert s["output_throughput"] == 5.0 and s["total_token_throughput"] == 37.0
    assert s["median_ttft_ms"] == pytest.approx(250.0) and s["mean_tpot_ms"] == pytest.approx(75.0)
    assert s["p50_itl_ms"] == pytest.approx(75.0) and s["median_e2el_ms"] == pytest.approx(550.0)
    assert s["max_concurrent_requests"] == 2 and s["max_output_tokens_per_s"] == 10.0
    assert (s["total_cached_tokens"], s["prefix_cache_hit_rate"]) == (16, 0.25)
    assert summarize(records, 2.0, 2, {}, [99])["request_goodput"] is None
