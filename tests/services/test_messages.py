"""Dataclass ⇄ message conversion by field name (services/messages.py), on the contract's own types."""
from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from llmrpc.engine.runner import EngineInfo
from llmrpc.engine.step import Sampling
from llmrpc.services.contract import Limits
from llmrpc.services.messages import from_message, to_message
from llmrpc.v1 import generation_pb2, worker_pb2


def test_unset_optional_fields_take_the_dataclass_defaults() -> None:
    s = generation_pb2.SamplingParams(top_k=5, seed=0, n=3, stop_token_ids=[7, 2], ignore_eos=False)
    assert from_message(Sampling, s) == Sampling(top_k=5, seed=0)  # a seed of 0 is set, not absent
    assert from_message(Limits, s) == Limits(n=3, stop_token_ids=(7, 2))
    assert from_message(Sampling, generation_pb2.SamplingParams()) == Sampling()
    assert from_message(Limits, generation_pb2.SamplingParams(), n=2) == Limits(n=2)


def test_every_sampling_and_limits_field_is_a_sampling_params_field() -> None:
    wire = set(generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    typed = {f.name for f in fields(Sampling)} | {f.name for f in fields(Limits)}
    assert wire - typed == {"stop"}  # stop strings are the tokenizer's, never a typed fact
    assert typed <= wire


def test_worker_info_is_engine_info_by_name_and_model_info_takes_the_model_facts() -> None:
    engine = EngineInfo(model_name="m", architecture="LlamaForCausalLM", context_length=2048, vocab_size=100,
                        eos_token_ids=(2, 3), num_pages=40, page_size=16, max_slots=8, device="cpu",
                        dtype="float32", model_path="/models/m", tp_rank=0, tp_size=1)
    info = to_message(engine, worker_pb2.WorkerInfo)
    assert info == worker_pb2.WorkerInfo(model_name="m", architecture="LlamaForCausalLM", context_length=2048,
                                         vocab_size=100, eos_token_ids=[2, 3], num_pages=40, page_size=16,
                                         max_slots=8, tp_rank=0, tp_size=1, device="cpu", dtype="float32")
    load = dict(kv_pages_total=40, kv_pages_free=40, kv_pages_cached=0, requests_running=0, requests_waiting=0)
    model = to_message(info, generation_pb2.ModelInfo, total_kv_tokens=640, **load)
    assert (model.model_name, list(model.eos_token_ids), model.tp_size, model.total_kv_tokens) == ("m", [2, 3], 1, 640)
    with pytest.raises(TypeError, match="kv_pages_total"):  # a field no side supplies is refused, not zero
        to_message(info, generation_pb2.ModelInfo, total_kv_tokens=640)


def test_a_field_one_side_lacks_is_an_error() -> None:
    @dataclass(frozen=True)
    class Extra:
        temperature: float = 1.0
        warmth: float = 0.0

    with pytest.raises(TypeError, match="warmth"):
        from_message(Extra, generation_pb2.SamplingParams())
    with pytest.raises(TypeError, match="cannot be unset"):
        to_message(Sampling(), worker_pb2.Admission, slot=None, prompt_tokens=b"")
