"""Packs Steps into StepCommands and back: the scheduler ⇄ worker wire format.

Arrays travel as little-endian bytes (numpy frombuffer on the other side), so a
decode step over B rows costs O(B) bytes and microseconds to encode. An Admission
is a SlotParams field for field (services/messages.py), so a new sampling fact
needs a proto field of the same name and no code here. A constraint travels as a
GrammarSpec (its kind and spec text), and the worker's refusal of one names the
request's field (`constraint_error`).
"""
from __future__ import annotations

import numpy as np

from llmrpc.engine.constraint import Constraint, ConstraintError
from llmrpc.engine.step import SlotParams, Step, StepOutput
from llmrpc.services.messages import from_message, to_message
from llmrpc.services.status import FieldError
from llmrpc.v1 import worker_pb2

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


def _pack(array: np.ndarray, dtype: np.dtype = _I32) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _unpack(data: bytes, dtype: np.dtype = _I32) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype)


def encode_grammar(c: Constraint) -> worker_pb2.GrammarSpec:
    return to_message(c, worker_pb2.GrammarSpec)


def decode_grammar(msg: worker_pb2.GrammarSpec) -> Constraint:
    return from_message(Constraint, msg)


def constraint_error(exc: ConstraintError) -> FieldError:
    """The engine's refusal of a constraint as the request's field (`sampling.constraint.regex`)."""
    field = f"sampling.{exc.field}"
    return FieldError(field, f"{field}: {exc.message}")


def encode_admission(p: SlotParams) -> worker_pb2.Admission:
    # Every Admission field but the packed token lists and the grammar is a SlotParams field of the same name.
    return to_message(p, worker_pb2.Admission, prompt_tokens=_pack(np.asarray(p.prompt_tokens, dtype=_I32)),
                      output_tokens=_pack(np.asarray(p.output_tokens, dtype=_I32)),
                      constraint=None if p.constraint is None else encode_grammar(p.constraint))


def decode_admission(msg: worker_pb2.Admission) -> SlotParams:
    return from_message(SlotParams, msg, prompt_tokens=tuple(_unpack(msg.prompt_tokens).tolist()),
                        output_tokens=tuple(_unpack(msg.output_tokens).tolist()),
                        constraint=decode_grammar(msg.constraint) if msg.HasField("constraint") else None)


def encode_step(step: Step) -> worker_pb2.StepCommand:
    return worker_pb2.StepCommand(
        step_id=step.step_id,
        admissions=[encode_admission(p) for p in step.admissions],
        num_decode=step.num_decode,
        slots=_pack(step.slots),
        starts=_pack(step.starts),
        chunk_lens=_pack(step.chunk_lens),
        chunk_tokens=_pack(step.chunk_tokens),
        sample_chunks=_pack(step.sample_chunks, np.dtype("i1")),
        page_counts=_pack(step.page_counts),
        page_ids=_pack(step.page_ids),
        decode_steps=step.decode_steps if step.decode_steps > 1 else 0,  # unset reads as one pass
    )


def decode_step(msg: worker_pb2.StepCommand) -> Step:
    return Step(
        step_id=msg.step_id,
        num_decode=msg.num_decode,
        slots=_unpack(msg.slots),
        starts=_unpack(msg.starts),
        chunk_lens=_unpack(msg.chunk_lens),
        chunk_tokens=_unpack(msg.chunk_tokens),
        sample_chunks=_unpack(msg.sample_chunks, np.dtype("i1")).astype(bool),
        page_counts=_unpack(msg.page_counts),
        page_ids=_unpack(msg.page_ids),
        admissions=[decode_admission(a) for a in msg.admissions],
        decode_steps=max(msg.decode_steps, 1),
    )


def encode_output(out: StepOutput) -> worker_pb2.StepResult:
    msg = worker_pb2.StepResult(step_id=out.step_id, tokens=_pack(out.tokens))
    if out.logprobs is not None:
        msg.logprobs = _pack(out.logprobs, _F32)
    if out.top_ids is not None and out.top_logprobs is not None:
        msg.top_ids = _pack(out.top_ids)
        msg.top_logprobs = _pack(out.top_logprobs, _F32)
    return msg


def decode_output(msg: worker_pb2.StepResult) -> StepOutput:
    tokens = _unpack(msg.tokens)
    n = len(tokens)
    logprobs = _unpack(msg.logprobs, _F32) if msg.logprobs else None
    top_ids = top_logprobs = None
    if msg.top_ids and n:
        top_ids = _unpack(msg.top_ids).reshape(n, -1)
        top_logprobs = _unpack(msg.top_logprobs, _F32).reshape(n, -1)
    return StepOutput(msg.step_id, tokens, logprobs, top_ids, top_logprobs)
