"""SchedulerConfig and Request: validation of settings, and the SlotParams a request takes to its slot."""
from __future__ import annotations

import pytest

from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.request import Request, Sampling


def test_config_refuses_impossible_settings():
    base = dict(num_pages=8, page_size=4, max_slots=2, context_length=64, eos_token_ids=(0,))
    assert SchedulerConfig(**base).schedule_policy == "fcfs"
    with pytest.raises(ValueError, match="schedule_policy"):
        SchedulerConfig(**base, schedule_policy="lifo")
    with pytest.raises(ValueError, match="page_size"):
        SchedulerConfig(**{**base, "page_size": 0})


def test_slot_params_carry_the_sampling_facts_and_the_prompt_only_for_penalties():
    plain = Request("a", [1, 2, 3], Sampling(temperature=0.0, top_k=5, seed=7, logprobs=2))
    p = plain.slot_params(3)
    assert (p.slot, p.temperature, p.top_k, p.seed, p.logprobs, p.prompt_tokens) == (3, 0.0, 5, 7, 2, ())
    penalized = Request("b", [1, 2, 3], Sampling(frequency_penalty=0.5))
    assert penalized.slot_params(0).prompt_tokens == (1, 2, 3)
    assert Request("c", [4], max_tokens=3).usage == (1, 0, 0)
