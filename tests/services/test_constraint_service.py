"""Constrained decoding across real processes: the scheduler's token-level Generate, the tokenizer's front
door, SMG's engine contract, and a worker whose model has no tokenizer. Bad grammars are INVALID_ARGUMENT
naming the field (google.rpc.BadRequest), and the server serves the next request.
"""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import grpc
import jsonschema
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc

from llmrpc.bench.tiny_model import build_tiny_llama
from llmrpc.engine.hub import load_tokenizer
from llmrpc.services.rpc import channel
from llmrpc.services.status import bad_fields
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.services.conftest import service, wait_status

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
    "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
    "tags": {"type": "array", "items": {"enum": ["old", "big", "coastal"]}, "minItems": 1, "maxItems": 2}},
    "required": ["city", "population", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    return load_tokenizer(default_model_dir)


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


async def generate(target: str, request: pb.GenerateRequest) -> dict[int, pb.GenerateResponse]:
    """Each index's merged answer (tokens, text, finish reason)."""
    async with channel(target) as ch:
        merged: dict[int, pb.GenerateResponse] = {}
        async for r in generation_pb2_grpc.GenerationStub(ch).Generate(request, timeout=120):
            m = merged.setdefault(r.index, pb.GenerateResponse(index=r.index))
            m.token_ids.extend(r.token_ids)
            m.text += r.text
            if r.finish_reason:
                m.finish_reason = r.finish_reason
        return merged


async def refusal(target: str, request: pb.GenerateRequest) -> tuple[str, list[str], str]:
    try:
        await generate(target, request)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, bad_fields(exc), exc.details()
    return "OK", [], ""


def test_constrained_generate_through_the_scheduler_and_the_front_door(default_stack, tokenizer) -> None:
    ids = chat_ids(tokenizer, "Describe a city as JSON.")
    schema = pb.Constraint(json_schema=json.dumps(SCHEMA))
    by_tokens = pb.GenerateRequest(tokens=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
        max_tokens=64, temperature=0.8, n=3, seed=1, constraint=schema))
    by_chat = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Pick a code.")]),
                                 sampling=pb.SamplingParams(max_tokens=16, temperature=0.8,
                                                            constraint=pb.Constraint(regex="[A-Z]{2}-[0-9]{4}")))

    async def run():
        return await asyncio.gather(generate(default_stack.scheduler, by_tokens),
                                    generate(default_stack.tokenizer, by_chat))

    sampled, coded = asyncio.run(run())
    assert sorted(sampled) == [0, 1, 2]
    for answer in sampled.values():
        assert answer.finish_reason == pb.FINISH_REASON_STOP
        jsonschema.validate(json.loads(tokenizer.decode(answer.token_ids, skip_special_tokens=True)), SCHEMA)
    assert coded[0].finish_reason == pb.FINISH_REASON_STOP and re.fullmatch("[A-Z]{2}-[0-9]{4}", coded[0].text)


def test_bad_grammars_are_invalid_argument_by_field_and_the_server_serves_on(default_stack) -> None:
    cases = [
        (pb.Constraint(json_schema='{"type": 5}'), "sampling.constraint.json_schema"),  # xgrammar refuses it
        (pb.Constraint(json_schema="{not json"), "sampling.constraint.json_schema"),  # the scheduler does
        (pb.Constraint(regex="(a|"), "sampling.constraint.regex"),
        (pb.Constraint(ebnf="root ::= undefined_rule"), "sampling.constraint.ebnf"),
        (pb.Constraint(choice=pb.Choice()), "sampling.constraint.choice.values"),
    ]

    def request(constraint: pb.Constraint, text: bool = False) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(max_tokens=4, constraint=constraint)
        if text:
            return pb.GenerateRequest(text="Hello", sampling=sampling)
        return pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6, 7]), sampling=sampling)

    async def run():
        got = [await refusal(default_stack.scheduler, request(c)) for c, _ in cases]
        front = await refusal(default_stack.tokenizer, request(cases[2][0], text=True))  # relayed, field intact
        after = await generate(default_stack.scheduler, request(pb.Constraint(choice=pb.Choice(values=["ok"]))))
        return got, front, after

    got, front, after = asyncio.run(run())
    assert [(code, fields) for code, fields, _ in got] == [("INVALID_ARGUMENT", [f]) for _, f in cases]
    for (_, _, message), (_, field) in zip(got, cases):
        assert message.startswith(field), message
    assert front[:2] == ("INVALID_ARGUMENT", ["sampling.constraint.regex"])
    assert after[0].finish_reason == pb.FINISH_REASON_STOP and len(after[0].token_ids) >= 1


def test_smg_contract_grammars(default_stack, tokenizer) -> None:
    ids = chat_ids(tokenizer, "Describe a city as JSON.")

    def request(**constraint) -> sg.GenerateRequest:
        return sg.GenerateRequest(
            request_id=f"smg-{next(iter(constraint))}", tokenized=sg.TokenizedInput(input_ids=ids),
            sampling_params=sg.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=64, n=1,
                                              **constraint), logprob_start_len=-1)

    async def run():
        async with channel(default_stack.scheduler) as ch:
            stub = sg_grpc.SglangSchedulerStub(ch)
            answers = [[r async for r in stub.Generate(request(**c), timeout=60)] for c in (
                dict(json_schema=json.dumps(SCHEMA)), dict(regex="[0-9]{4}"), dict(ebnf_grammar='root ::= "a" | "b"'))]
            refused = []
            for c in (dict(regex="[0-"), dict(json_schema='{"type": 5}'), dict(ebnf_grammar="root ::= x"),
                      dict(structural_tag="{}")):
                try:
                    await stub.Generate(request(**c), timeout=60).read()
                except grpc.aio.AioRpcError as exc:
                    refused.append((exc.code().name, bad_fields(exc), exc.details()))
            return answers, refused

    answers, refused = asyncio.run(run())
    texts = []
    for answer in answers:
        (complete,) = [r.complete for r in answer if r.HasField("complete")]
        assert complete.finish_reason == "stop"
        texts.append(tokenizer.decode(complete.output_ids, skip_special_tokens=True))
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert re.fullmatch("[0-9]{4}", texts[1]) and texts[2] in ("a", "b")
    fields = ["sampling_params.regex", "sampling_params.json_schema", "sampling_params.ebnf_grammar",
              "sampling_params.structural_tag"]
    assert [(code, f) for code, f, _ in refused] == [("INVALID_ARGUMENT", [f]) for f in fields]
    for (_, _, message), field in zip(refused, fields):
        assert message.startswith(field) and "sampling." not in message, message


@pytest.fixture(scope="module")
def bare_stack(tmp_path_factory: pytest.TempPathFactory):
    """A worker and a scheduler on a random-weights model with no tokenizer files."""
    tmp = tmp_path_factory.mktemp("bare")
    model = build_tiny_llama(tmp / "model", tmp / "no-tokenizer", 256)
    worker = service(tmp, "worker", "--model", model, "--device", "cpu", "--max-running-requests", 4,
                     "--max-total-tokens", 1024)
    scheduler = service(tmp, "scheduler", "--workers", worker.target, "--check-kv-invariants")
    try:
        for svc in (worker, scheduler):
            svc.start()
        for svc in (worker, scheduler):
            wait_status(svc, "SERVING")
        yield scheduler
    finally:
        scheduler.stop()
        worker.stop()


def test_a_model_without_a_tokenizer_refuses_constraints_and_serves_on(bare_stack) -> None:
    constrained = pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams(
        constraint=pb.Constraint(json_object=True)))
    plain = pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6, 7]),
                               sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))

    async def run():
        return await refusal(bare_stack.target, constrained), await generate(bare_stack.target, plain)

    (code, fields, message), served = asyncio.run(run())
    assert (code, fields) == ("INVALID_ARGUMENT", ["sampling.constraint"])
    assert message.startswith("sampling.constraint: the model has no tokenizer"), message
    assert len(served[0].token_ids) == 3
