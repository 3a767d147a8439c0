"""ModelRunner.execute on a tiny random (dummy-format) Qwen3: outputs, seeds, logprobs, refused steps."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from llmrpc.engine.config import EngineConfig
from llmrpc.engine.runner import ModelRunner
from llmrpc.engine.step import SlotParams, Step

PAGE = 4


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    path = tmp_path_factory.mktemp("qwen3")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "eos_token_id": [7, 8]}))
    return ModelRunner(EngineConfig(model_path=str(path), load_format="dummy", page_size=PAGE,
                                    max_total_tokens=PAGE * 40, max_slots=6, seed=3))


def _i32(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int32)


def _prefill(step_id: int, slots: list[int], prompt: list[int], pages: list[list[int]], admissions) -> Step:
    return Step(step_id, 0, slots=np.array(slots, np.int32), starts=np.zeros(len(slots), np.int32),
                chunk_lens=np.full(len(slots), len(prompt), np.int32),
                chunk_tokens=np.array(prompt * len(slots), np.int32), sample_chunks=np.ones(len(slots), bool),
                page_counts=np.array([len(p) for p in pages], np.int32),
                page_ids=np.array([i for p in pages for i in p], np.int32), admissions=admissions)


def _decode(step_id: int, slots: list[int], start: int) -> Step:
    return Step(step_id, len(slots), slots=np.array(slots, np.int32), starts=np.full(len(slots), start, np.int32),
                page_counts=np.zeros(len(slots), np.int32))


def test_info_describes_the_engine(runner: ModelRunner) -> None:
    i = runner.info
    assert (i.architecture, i.vocab_size, i.eos_token_ids, i.context_length) == ("Qwen3ForCausalLM", 300, (7, 8), 64)
    assert (i.num_pages, i.page_size, i.max_slots, i.device, i.dtype) == (40, PAGE, 6, "cpu", "float32")
    assert (i.tp_rank, i.tp_size, i.attention_backend) == (0, 1, "torch")


def test_same_seed_same_tokens_in_one_batch(runner: ModelRunner) -> None:
    prompt = [11, 22, 33, 44, 55]
    params = [SlotParams(s, temperature=1.0, top_k=50, seed=123) for s in (0, 4)] + [SlotParams(2, temperature=1.0)]
    out = runner.execute(_prefill(0, [0, 4, 2], prompt, [[0, 1, 2], [3, 4, 5], [6, 7, 8]], params))
    streams = [[t] for t in out.tokens.tolist()]
    for i in range(6):
        out = runner.execute(_decode(i + 1, [0, 4, 2], len(prompt) + i))
        for s, t in zip(streams, out.tokens.tolist()):
            s.append(t)
    assert streams[0] == streams[1]
    assert streams[2] != streams[0]
    assert out.logprobs is None and out.top_ids is None


@pytest.mark.parametrize("top_k", [50, -1], ids=["filtered", "race"])
def test_a_seeded_request_recomputed_in_another_slot_draws_on(runner: ModelRunner, top_k: int) -> None:
    # What a retraction does: the request's prompt and outputs so far are prefilled again, in a
    # new slot, and sampling goes on from there. Seeded draws depend on (seed, position) only.
    prompt = [11, 22, 33, 44, 55]
    params = SlotParams(0, temperature=1.0, top_k=top_k, seed=7)
    out = runner.execute(_prefill(0, [0], prompt, [[12, 13, 14]], [params]))
    tokens = out.tokens.tolist()
    for i in range(5):
        tokens += runner.execute(_decode(i + 1, [0], len(prompt) + i)).tokens.tolist()
    redo = prompt + tokens[:3]
    again = runner.execute(_prefill(6, [3], redo, [[15, 16, 17]], [dataclasses.replace(params, slot=3)])).tokens.tolist()
    for i in range(2):
        again += runner.execute(_decode(7 + i, [3], len(redo) + i)).tokens.tolist()
    assert again == tokens[3:]
    assert len(set(tokens)) > 1  # really sampled, not a constant


def test_logprobs_come_back_per_sampled_row(runner: ModelRunner) -> None:
    out = runner.execute(_prefill(0, [1, 3], [5, 6, 7], [[10], [11]],
                                  [SlotParams(1, temperature=0.0, logprobs=4), SlotParams(3, temperature=0.0)]))
    assert out.tokens.shape == (2,) and out.logprobs.shape == (2,)
    assert out.top_ids.shape == (2, 4) and out.top_logprobs.shape == (2, 4)
    # Greedy: the sampled token is the most likely one.
    assert out.top_ids[:, 0].tolist() == out.tokens.tolist()
    np.testing.assert_array_equal(out.logprobs, out.top_logprobs[:, 0])
    assert np.all(np.diff(out.top_logprobs, axis=1) <= 0) and np.all(out.top_logprobs < 0)


def test_steps_without_sampling_rows(runner: ModelRunner) -> None:
    assert runner.execute(Step(0, admissions=[SlotParams(5)])).tokens.shape == (0,)
    # A middle chunk of a prompt samples nothing.
    out = runner.execute(Step(1, 0, slots=_i32(5), starts=_i32(0), chunk_lens=_i32(4), chunk_tokens=_i32(1, 2, 3, 4),
                              sample_chunks=np.array([False]), page_counts=_i32(1), page_ids=_i32(20)))
    assert out.tokens.shape == (0,)


def test_refuses_rows_without_kv_room(runner: ModelRunner) -> None:
    step = Step(0, 0, slots=_i32(5), starts=_i32(0), chunk_lens=_i32(5), chunk_tokens=_i32(1, 2, 3, 4, 5),
                sample_chunks=np.array([True]), page_counts=_i32(1), page_ids=_i32(30),
                admissions=[SlotParams(5)])
    with pytest.raises(ValueError, match="slot 5 needs KV room for 5 tokens but its pages hold 4"):
        runner.execute(step)


def test_k_decode_passes_are_k_single_steps(runner: ModelRunner) -> None:
    """One step of 3 passes (pages for all 3 positions sent up front) gives the tokens, step-major, of
    three one-pass steps; a multi-pass step with a prefill row, or without the pages, is refused."""
    prompt = [9, 8, 7, 6, 5, 4, 3]  # 7 tokens: positions 7, 8, 9 decode onto a third page
    params = [SlotParams(1, temperature=0.0), SlotParams(3, temperature=1.0, seed=5)]
    singles = []
    for base, step_ids in ((0, (0, 1, 2, 3)), (6, (4, 5))):
        pages = [[base + 1, base + 2, base + 3], [base + 4, base + 5, base + 6]]
        first = runner.execute(_prefill(step_ids[0], [1, 3], prompt, [p[:2] for p in pages], params))
        if base == 0:
            singles.append(first.tokens)
            for i in range(3):
                step = _decode(step_ids[1 + i], [1, 3], len(prompt) + i)
                step.page_counts = _i32(1, 1) if i == 1 else _i32(0, 0)  # position 8 starts page 3
                step.page_ids = _i32(base + 3, base + 6) if i == 1 else _i32()
                singles.append(runner.execute(step).tokens)
        else:
            assert np.array_equal(first.tokens, singles[0])
            block = dataclasses.replace(_decode(step_ids[1], [1, 3], len(prompt)), decode_steps=3,
                                        page_counts=_i32(1, 1), page_ids=_i32(base + 3, base + 6))
            assert block.num_sampled == 6
            assert runner.execute(block).tokens.tolist() == np.concatenate(singles[1:]).tolist()
    mixed = dataclasses.replace(_prefill(9, [5], [1, 2], [[30]], [SlotParams(5)]), decode_steps=2)
    with pytest.raises(ValueError, match="2 decode steps need every row to decode, 1 of 1 rows prefill"):
        runner.execute(mixed)
    # Positions 10-13 need a fourth page: refused before any pass runs, so slot 1's last token stays.
    last = runner.last_tokens[1].item()
    short = dataclasses.replace(_decode(10, [1], len(prompt) + 3), decode_steps=4)
    with pytest.raises(ValueError, match="step 10: slot 1 needs KV room for 14 tokens but its pages hold 12"):
        runner.execute(short)
    assert runner.last_tokens[1].item() == last


def test_logits_only_at_the_sampled_rows_and_equal_to_the_full_ones(runner: ModelRunner) -> None:
    # Two prompt chunks in one step; only the second samples. The LM head runs on its last token
    # alone, and gives what it gives over every token's hidden state at that row.
    step = Step(0, 0, slots=_i32(1, 2), starts=_i32(0, 0), chunk_lens=_i32(3, 4),
                chunk_tokens=_i32(5, 6, 7, 8, 9, 10, 11), sample_chunks=np.array([False, True]),
                page_counts=_i32(1, 1), page_ids=_i32(25, 26), admissions=[SlotParams(1), SlotParams(2)])
    batch = runner.prepare(step)
    logits = runner.forward(batch)
    assert logits.shape == (1, runner.info.vocab_size)
    assert batch.sample_indices.tolist() == [6]
    runner.attention.plan(batch.attention)  # the same step again, every token's logits
    full = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, runner.attention))
    torch.testing.assert_close(logits, full[6:7], rtol=1e-5, atol=1e-5)
