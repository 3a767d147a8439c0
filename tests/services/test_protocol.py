"""Byte-exact round trips of the scheduler ⇄ worker step protocol."""
from __future__ import annotations

import dataclasses

import numpy as np

from llmrpc.engine.step import SlotParams, Step, StepOutput
from llmrpc.services.protocol import decode_output, decode_step, encode_output, encode_step
from llmrpc.v1 import worker_pb2


def _mixed_step() -> Step:
    return Step(
        step_id=7,
        num_decode=2,
        slots=np.array([3, 0, 5], dtype=np.int32),
        starts=np.array([17, 40, 32], dtype=np.int32),
        chunk_lens=np.array([4], dtype=np.int32),
        chunk_tokens=np.array([11, 2**31 - 1, 0, 9], dtype=np.int32),
        sample_chunks=np.array([True]),
        page_counts=np.array([1, 0, 3], dtype=np.int32),
        page_ids=np.array([9, 4, 6, 1], dtype=np.int32),
        admissions=[
            SlotParams(slot=5, temperature=0.0, top_k=-1, seed=2**63, logprobs=3, prompt_tokens=(1, 2, 3)),
            SlotParams(slot=6, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
        ],
    )


def test_step_round_trip_is_exact() -> None:
    step = _mixed_step()
    wire = encode_step(step).SerializeToString()
    back = decode_step(worker_pb2.StepCommand.FromString(wire))
    assert back.step_id == step.step_id and back.num_decode == step.num_decode
    for name in ("slots", "starts", "chunk_lens", "chunk_tokens", "sample_chunks", "page_counts", "page_ids"):
        assert np.array_equal(getattr(back, name), getattr(step, name)), name
        assert getattr(back, name).dtype == getattr(step, name).dtype, name
    assert [a.slot for a in back.admissions] == [5, 6]
    assert back.admissions[0].seed == 2**63 and back.admissions[1].seed is None
    assert back.admissions[0].prompt_tokens == (1, 2, 3)
    assert back.admissions[1].top_p == np.float32(0.9)
    assert encode_step(back).SerializeToString() == wire
    assert back.num_sampled == 3 and back.num_tokens == 6


def test_multi_step_decode_round_trip() -> None:
    step = Step(step_id=9, num_decode=2, slots=np.array([3, 1], np.int32), starts=np.array([40, 7], np.int32),
                page_counts=np.array([1, 0], np.int32), page_ids=np.array([12], np.int32), decode_steps=4)
    wire = encode_step(step).SerializeToString()
    back = decode_step(worker_pb2.StepCommand.FromString(wire))
    assert (back.decode_steps, back.num_sampled, back.num_tokens) == (4, 8, 8)
    assert encode_step(back).SerializeToString() == wire
    # A one-pass step leaves the field unset (0 on the wire reads as 1), so its bytes are as before.
    one = dataclasses.replace(step, decode_steps=1)
    assert not worker_pb2.StepCommand.FromString(encode_step(one).SerializeToString()).decode_steps
    assert decode_step(encode_step(one)).decode_steps == 1
    assert [p.starts.tolist() for p in map(step.decode_pass, range(4))] == [[40, 7], [41, 8], [42, 9], [43, 10]]
    assert [p.page_counts.tolist() for p in map(step.decode_pass, range(2))] == [[1, 0], [0, 0]]


def test_decode_step_is_compact() -> None:
    """A decode step for B rows is O(B) bytes: about 12 bytes a row, no per-request facts."""
    rows = 256
    step = Step(step_id=1, num_decode=rows, slots=np.arange(rows, dtype=np.int32),
                starts=np.full(rows, 100, dtype=np.int32), page_counts=np.zeros(rows, dtype=np.int32))
    size = len(encode_step(step).SerializeToString())
    assert size <= 12 * rows + 32


def test_output_round_trip() -> None:
    out = StepOutput(3, np.array([5, 6], dtype=np.int32), np.array([-0.5, -1.25], dtype=np.float32),
                     np.array([[5, 1], [6, 2]], dtype=np.int32), np.array([[-0.5, -2], [-1.25, -3]], dtype=np.float32))
    back = decode_output(worker_pb2.StepResult.FromString(encode_output(out).SerializeToString()))
    assert back.step_id == 3
    assert np.array_equal(back.tokens, out.tokens) and np.array_equal(back.logprobs, out.logprobs)
    assert np.array_equal(back.top_ids, out.top_ids) and np.array_equal(back.top_logprobs, out.top_logprobs)
    plain = decode_output(worker_pb2.StepResult.FromString(encode_output(StepOutput(4, out.tokens)).SerializeToString()))
    assert plain.logprobs is None and plain.top_ids is None


def test_admission_is_slot_params_field_for_field() -> None:
    """A sampling fact added to SlotParams without a proto field of its name (or the reverse) fails here."""
    from dataclasses import fields

    assert {f.name for f in fields(SlotParams)} == set(worker_pb2.Admission.DESCRIPTOR.fields_by_name)
    plain = SlotParams(slot=1)
    back = decode_step(worker_pb2.StepCommand.FromString(
        encode_step(Step(step_id=0, admissions=[plain])).SerializeToString())).admissions[0]
    assert back == plain  # defaults survive, seed None included
