"""Sampling: greedy is argmax, filters keep what their definitions say, seeds reproduce, penalties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmrpc.engine.sampling import Sampler, apply_penalties, filtered_probs
from llmrpc.engine.step import SlotParams

VOCAB = 50


def _logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _probs(*p: float) -> torch.Tensor:
    """Logits whose softmax is exactly the distribution `p` (in a shuffled vocabulary order)."""
    return torch.tensor([math.log(x) for x in p], dtype=torch.float32)[None, :]


def _filter(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> torch.Tensor:
    one = lambda v, dt: torch.tensor([v], dtype=dt)  # noqa: E731
    return filtered_probs(logits, one(temperature, torch.float32), one(top_k, torch.int64),
                          one(top_p, torch.float32), one(min_p, torch.float32))[0]


def test_greedy_and_top_k_1_are_argmax() -> None:
    logits = _logits(6)
    sampler = Sampler(max_slots=8, vocab_size=VOCAB, device="cpu", seed=0)
    for slot in range(3):
        sampler.admit(SlotParams(slot, temperature=0.0))
    for slot in range(3, 6):
        sampler.admit(SlotParams(slot, temperature=1.3, top_k=1, seed=slot))
    tokens = sampler.sample(logits, np.array([0, 3, 1, 4, 2, 5]), np.full(6, 10)).tokens
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_the_shortest_prefix_reaching_p() -> None:
    logits = _probs(0.15, 0.5, 0.05, 0.2, 0.1)
    expected = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]) / 0.7
    torch.testing.assert_close(_filter(logits, top_p=0.6), expected)
    torch.testing.assert_close(_filter(logits, top_p=0.75), torch.tensor([0.15, 0.5, 0.0, 0.2, 0.0]) / 0.85)
    torch.testing.assert_close(_filter(logits, top_p=0.3), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(_filter(logits, top_p=1.0), torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1]))


def test_min_p_keeps_tokens_at_least_min_p_times_the_top() -> None:
    logits = _probs(0.15, 0.5, 0.05, 0.2, 0.1)
    # threshold 0.125: 0.5, 0.2 and 0.15 stay
    torch.testing.assert_close(_filter(logits, min_p=0.25), torch.tensor([0.15, 0.5, 0.0, 0.2, 0.0]) / 0.85)
    torch.testing.assert_close(_filter(logits, min_p=0.19), torch.tensor([0.15, 0.5, 0.0, 0.2, 0.1]) / 0.95)


def test_temperature_then_top_k_then_top_p_over_what_is_left() -> None:
    logits = _probs(0.15, 0.5, 0.05, 0.2, 0.1)
    # temperature 2: p ∝ sqrt(p)
    root = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1]).sqrt()
    torch.testing.assert_close(_filter(logits, temperature=2.0), root / root.sum())
    top3 = root * torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(_filter(logits, temperature=2.0, top_k=3), top3 / top3.sum())
    # top-p renormalizes over the top 2 (0.5, 0.2 → 5/7, 2/7): 0.7 < 5/7, so only the first stays.
    torch.testing.assert_close(_filter(logits, top_k=2, top_p=0.7), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def test_draws_follow_the_filtered_distribution() -> None:
    logits = _probs(0.15, 0.5, 0.05, 0.2, 0.1).repeat(200, 1)
    sampler = Sampler(max_slots=200, vocab_size=5, device="cpu", seed=3)
    for slot in range(200):
        sampler.admit(SlotParams(slot, temperature=1.0, top_p=0.75))
    counts = np.zeros(5)
    for _ in range(20):
        counts += np.bincount(sampler.sample(logits, np.arange(200), np.full(200, 10)).tokens.numpy(), minlength=5)
    assert counts[2] == counts[4] == 0  # filtered out: never drawn
    np.testing.assert_allclose(counts / counts.sum(), np.array([0.15, 0.5, 0.0, 0.2, 0.0]) / 0.85, atol=0.02)


def _draws(sampler: Sampler, slots: list[int], steps: int, watched: int, first: int = 0) -> list[int]:
    """The watched slot's tokens at positions 50 + first .. 50 + first + steps - 1."""
    out = []
    for step in range(first, first + steps):
        # The watched request's row is the same in every run; the other rows vary.
        rows = [_logits(1, seed=100 + step, vocab=1000) if s == watched else _logits(1, seed=s * step, vocab=1000)
                for s in slots]
        positions = np.array([50 + step if s == watched else 7 * s + step for s in slots])
        tokens = sampler.sample(torch.cat(rows) * 0.1, np.array(slots), positions).tokens
        out.append(int(tokens[slots.index(watched)]))
    return out


def test_seeded_draws_reproduce_whatever_shares_the_batch() -> None:
    alone = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=0)
    alone.admit(SlotParams(0, temperature=1.0, seed=42))
    crowded = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=99)
    for slot in (1, 2, 3):
        crowded.admit(SlotParams(slot, temperature=0.8))
    crowded.admit(SlotParams(5, temperature=1.0, seed=42))
    first = _draws(alone, [0], 20, watched=0)
    assert _draws(crowded, [5, 1, 2, 3], 20, watched=5) == first
    # Draws follow (seed, position): re-admitted at the same positions, the seed draws the same;
    # another seed draws others.
    alone.admit(SlotParams(0, temperature=1.0, seed=42))
    assert _draws(alone, [0], 20, watched=0) == first
    alone.admit(SlotParams(0, temperature=1.0, seed=43))
    assert _draws(alone, [0], 20, watched=0) != first


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["race", "filtered"])
def test_a_seeded_request_moved_to_another_slot_draws_on_from_its_position(top_p: float) -> None:
    # A retracted request comes back in another slot, beside other requests, and samples on from
    # the position where it stopped: its draws go on as if it had never left.
    alone = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=0)
    alone.admit(SlotParams(0, temperature=1.0, top_p=top_p, seed=42))
    whole = _draws(alone, [0], 20, watched=0)
    moved = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=1)
    moved.admit(SlotParams(2, temperature=1.0, top_p=top_p, seed=42))
    before = _draws(moved, [2], 8, watched=2)
    moved.admit(SlotParams(5, temperature=1.0, top_p=top_p, seed=42))
    moved.admit(SlotParams(2, temperature=0.8))
    assert before + _draws(moved, [2, 5], 12, watched=5, first=8) == whole


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt = torch.tensor([[True, True, False, False, False]])
    counts = torch.tensor([[0, 0, 2, 1, 0]], dtype=torch.int32)
    out = apply_penalties(logits, prompt, counts, repetition=torch.tensor([2.0]),
                          frequency=torch.tensor([0.5]), presence=torch.tensor([0.25]))
    # seen: 0, 1 (prompt), 2, 3 (output). Repetition halves positives and doubles negatives;
    # then frequency × count and presence once, over output tokens only.
    expected = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, 1.5 - 0.5 - 0.25, -2.0]])
    torch.testing.assert_close(out, expected)


def test_sampler_applies_penalties_over_prompt_and_output() -> None:
    sampler = Sampler(max_slots=4, vocab_size=5, device="cpu")
    sampler.admit(SlotParams(1, temperature=0.0, frequency_penalty=1.5, prompt_tokens=(4,)))
    sampler.admit(SlotParams(2, temperature=0.0, repetition_penalty=10.0, prompt_tokens=(3,)))
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5]]).repeat(2, 1)
    slots = np.array([1, 2])
    # Frequency counts output only: slot 1 takes 3, then 2 (3 - 1.5 < 2), then 3 again (1.5 > 2 - 1.5).
    seen = [sampler.sample(logits, slots, np.array([5 + i, 5 + i])).tokens.tolist() for i in range(3)]
    assert [s[0] for s in seen] == [3, 2, 3]
    # Repetition covers the prompt: slot 2's 3 is penalized from the start; its picks then shrink too.
    assert [s[1] for s in seen] == [2, 1, 4]


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = _logits(3)
    sampler = Sampler(max_slots=4, vocab_size=VOCAB, device="cpu")
    sampler.admit(SlotParams(0, temperature=0.0, logprobs=3))
    sampler.admit(SlotParams(1, temperature=0.7, logprobs=0, seed=1))
    sampler.admit(SlotParams(2, temperature=0.0))
    result = sampler.sample(logits, np.array([0, 1, 2]), np.array([3, 3, 3]))
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(result.logprobs, logp.gather(1, result.tokens[:, None]).squeeze(1))
    top, ids = logp.topk(3)
    assert torch.equal(result.top_ids, ids)
    torch.testing.assert_close(result.top_logprobs, top)


def test_invalid_parameters_are_refused() -> None:
    sampler = Sampler(max_slots=2, vocab_size=VOCAB, device="cpu")
    for bad in (SlotParams(0, temperature=-1.0), SlotParams(0, top_p=0.0), SlotParams(0, min_p=1.5),
                SlotParams(0, repetition_penalty=0.0)):
        with pytest.raises(ValueError, match="invalid sampling parameters"):
            sampler.admit(bad)


def test_race_draws_follow_softmax_over_temperature() -> None:
    # Rows that filter nothing take the exponential race; its draws must be softmax(logits / T).
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.0, 0.7, -2.0, 1.5, 0.3]])
    temperature, rows, steps = 0.6, 400, 50
    sampler = Sampler(max_slots=rows, vocab_size=8, device="cpu", seed=7)
    for slot in range(rows):
        sampler.admit(SlotParams(slot, temperature=temperature))
    counts = np.zeros(8)
    for _ in range(steps):
        counts += np.bincount(sampler.sample(logits.repeat(rows, 1), np.arange(rows), np.full(rows, 9)).tokens.numpy(),
                              minlength=8)
    expected = (logits[0] / temperature).softmax(-1).double().numpy() * rows * steps
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_race_rows_are_reproducible_beside_greedy_and_filtering_rows() -> None:
    alone = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=0)
    alone.admit(SlotParams(0, temperature=0.9, seed=11))
    mixed = Sampler(max_slots=8, vocab_size=1000, device="cpu", seed=5)
    mixed.admit(SlotParams(1, temperature=0.0))
    mixed.admit(SlotParams(2, temperature=1.0, top_p=0.9, seed=3))
    mixed.admit(SlotParams(4, temperature=0.9, seed=11))
    mixed.admit(SlotParams(6, temperature=0.7, min_p=0.1))
    first = _draws(alone, [0], 20, watched=0)
    assert _draws(mixed, [1, 4, 2, 6], 20, watched=4) == first
    # The greedy neighbour stayed exactly argmax throughout.
    logits = _logits(4, seed=9, vocab=1000)
    tokens = mixed.sample(logits, np.array([1, 4, 2, 6]), np.array([3, 70, 3, 3])).tokens
    assert int(tokens[0]) == int(logits[0].argmax())


def test_bf16_logits_sample_without_an_upcast_copy() -> None:
    logits = _logits(3).to(torch.bfloat16)
    sampler = Sampler(max_slots=4, vocab_size=VOCAB, device="cpu")
    sampler.admit(SlotParams(0, temperature=0.0, logprobs=0))
    sampler.admit(SlotParams(1, temperature=0.6))
    sampler.admit(SlotParams(2, temperature=0.8, top_k=5))
    result = sampler.sample(logits, np.array([0, 1, 2]), np.array([4, 4, 4]))
    assert int(result.tokens[0]) == int(logits[0].float().argmax())
    assert int(result.tokens[2]) in logits[2].float().topk(5).indices.tolist()
    assert result.logprobs.dtype == torch.float32
    torch.testing.assert_close(result.logprobs, logits.float().log_softmax(-1).gather(1, result.tokens[:, None]).squeeze(1))
