"""The offline workload is the anchors' own, and its warm-up shares no prefix with it."""
from __future__ import annotations

from llmrpc.bench.workload import OUTPUT_TOKENS, PROMPT_TOKENS, offline_workload, warmup_workload


def test_the_warm_up_shares_not_even_a_first_token_with_the_timed_prompts() -> None:
    timed = offline_workload()
    assert (timed.prompt_tokens, timed.output_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)
    warm = warmup_workload(timed)
    assert len(warm.prompts) == 64 and {len(p) for p in warm.prompts} == {200} and set(warm.max_tokens) == {40}
    assert not {p[0] for p in warm.prompts} & {p[0] for p in timed.prompts}
    assert warmup_workload(timed) == warm  # the same every run
    assert offline_workload() == timed  # drawing the warm-up leaves the timed workload as it was
