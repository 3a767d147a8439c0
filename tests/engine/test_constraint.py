"""Grammar-constrained decoding (engine/constraint.py) through the in-process LLM: the scheduler core, the
step pipeline and ModelRunner, as the stack runs them.

The default model (SmolLM2-135M-Instruct) writes the JSON, regex and choice outputs that must all
hold; the tiny random Llama with the same tokenizer (bench/tiny_model.py), whose greedy logits are
far apart, carries the token-exact assertions (neighbours untouched, seeds and retraction). The KV
invariants are checked after every step, and every scenario ends with every page back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from llmrpc.bench.tiny_model import VOCAB, build_tiny_llama
from llmrpc.engine.constraint import Constraint, ConstraintTable
from llmrpc.engine.step import SlotParams, Step
from llmrpc.services.llm import LLM
from llmrpc.services.protocol import decode_step, encode_step
from llmrpc.services.status import FieldError
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import worker_pb2
from tests.conftest import assert_pages_all_back

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "role": {"enum": ["admin", "user", "guest"]}},
                 "required": ["id", "role"], "additionalProperties": False},
        "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "count": {"type": "integer", "minimum": 0, "maximum": 10}},
     "required": ["tags", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "ok": {"type": "boolean"}},
     "required": ["code", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2,5}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "note": {"enum": ["rush", "normal"]}},
     "required": ["items", "note"], "additionalProperties": False},
]
TOPICS = ["a person", "a user account", "a set of colour tags", "a product code", "an order"]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so", 'say "hi"']


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM(str(default_model_dir), check_invariants=True, max_slots=64, max_total_tokens=16384)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> LLM:
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny"), default_model_dir, 2048)
    return LLM(str(model), check_invariants=True, max_slots=32, max_total_tokens=8192)


def chat(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return list(tok.encode(rendered, add_special_tokens=False))


def text_of(llm: LLM, completion) -> str:
    return llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def json_sampling(schema: dict, **fields) -> pb.SamplingParams:
    return pb.SamplingParams(constraint=pb.Constraint(json_schema=json.dumps(schema)), **fields)


def test_json_schemas_parse_and_validate_at_temperature(llm: LLM) -> None:
    """50 prompts x 5 schemas (nested objects, enums, bounded arrays, string patterns), T = 0.8, one batch."""
    prompts, sampling, schemas = [], [], []
    for i in range(50):
        k = i % len(SCHEMAS)
        prompts.append(chat(llm, f"Write {TOPICS[k]} (example {i}) as JSON."))
        sampling.append(json_sampling(SCHEMAS[k], max_tokens=64, temperature=0.8))
        schemas.append(SCHEMAS[k])
    outputs = llm.generate(prompts, sampling)
    for out, schema in zip(outputs, schemas):
        (completion,) = out.outputs
        assert completion.finish_reason == "stop" and completion.token_ids[-1] in llm.runner.info.eos_token_ids
        jsonschema.validate(json.loads(text_of(llm, completion)), schema)
    assert len({text_of(llm, o.outputs[0]) for o in outputs}) > 25  # sampled, not one answer repeated
    assert_pages_all_back(llm)


def test_regex_choice_ebnf_json_object_and_n_hold_on_every_output(llm: LLM) -> None:
    ebnf = 'root ::= "(" digit+ ")" | "none"\ndigit ::= [0-9]'
    kinds = [pb.Constraint(regex=REGEX), pb.Constraint(choice=pb.Choice(values=CHOICES)),
             pb.Constraint(ebnf=ebnf), pb.Constraint(json_object=True)]
    prompts = [chat(llm, f"Answer question {i}.") for i in range(12)]
    sampling = [pb.SamplingParams(max_tokens=24, temperature=1.0, constraint=kinds[i % 4], n=2 if i < 4 else 1)
                for i in range(12)]
    outputs = llm.generate(prompts, sampling)
    for i, out in enumerate(outputs):
        assert len(out.outputs) == (2 if i < 4 else 1)
        for completion in out.outputs:  # n > 1: every sequence has its own matcher
            text = text_of(llm, completion)
            if i % 4 == 3 and completion.finish_reason == "length":
                continue  # an open-ended object may be cut by max_tokens; the others always close
            assert completion.finish_reason == "stop", (i, text)
            if i % 4 == 0:
                assert re.fullmatch(REGEX, text), text
            elif i % 4 == 1:
                assert text in CHOICES, text
            elif i % 4 == 2:
                assert re.fullmatch(r"\([0-9]+\)|none", text), text
            else:
                assert isinstance(json.loads(text), dict), text
    assert_pages_all_back(llm)


def test_max_tokens_inside_the_grammar_finishes_length(llm: LLM) -> None:
    (out,) = llm.generate([chat(llm, "A person as JSON.")], json_sampling(SCHEMAS[0], max_tokens=3, temperature=0.0))
    (completion,) = out.outputs
    assert completion.finish_reason == "length" and len(completion.token_ids) == 3
    assert text_of(llm, completion).startswith('{"name')  # a prefix of the grammar's language
    assert_pages_all_back(llm)


def test_unconstrained_rows_are_token_identical_beside_constrained_ones(tiny: LLM) -> None:
    rng = np.random.default_rng(11)
    plain = [rng.integers(3, 40000, n).tolist() for n in (5, 17, 30, 9)]
    greedy = pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny.generate(plain, greedy)]
    constrained = [pb.SamplingParams(max_tokens=12, temperature=0.0, constraint=pb.Constraint(regex="[0-9]{3}")),
                   pb.SamplingParams(max_tokens=12, temperature=0.9, seed=4,
                                     constraint=pb.Constraint(choice=pb.Choice(values=CHOICES)))]
    mixed = tiny.generate([plain[0], plain[1], plain[1], plain[2], plain[0], plain[3]],
                          [greedy, constrained[0], greedy, constrained[1], greedy, greedy])
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4, 5)] == [alone[0], alone[1], alone[0], alone[3]]
    assert re.fullmatch("[0-9]{3}", text_of(tiny, mixed[1].outputs[0]))
    assert text_of(tiny, mixed[3].outputs[0]) in CHOICES
    assert_pages_all_back(tiny)


class Recording(LLM):
    """An LLM that notes every admission that replays outputs into a fresh matcher."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replayed: list[SlotParams] = []

    def launch(self, step: Step):
        self.replayed.extend(a for a in step.admissions if a.output_tokens)
        return super().launch(step)


def test_seeded_outputs_reproduce_through_retraction_at_every_overlap_depth_and_k_passes(tiny: LLM) -> None:
    """A small pool forces retractions; each recompute replays the outputs into a fresh matcher, so the
    seeded outputs are the unpressured ones, token for token, and still validate."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 40000, 40).tolist() for _ in range(6)]
    sampling = [json_sampling(SCHEMAS[i % len(SCHEMAS)], max_tokens=80, temperature=0.8, seed=100 + i)
                for i in range(6)]
    want = [o.outputs[0] for o in tiny.generate(prompts, sampling)]
    for i, completion in enumerate(want):
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(tiny, completion)), SCHEMAS[i % len(SCHEMAS)])
    assert [o.outputs[0].token_ids for o in tiny.generate(prompts, sampling)] == [c.token_ids for c in want]
    small = LLM(str(tiny.runner.config.model_path), check_invariants=True, max_slots=8, max_total_tokens=16 * 12)
    for depth, passes in ((0, 1), (1, 1), (2, 1), (1, 4)):  # and multi-step decode: 4 passes a step
        pressured = Recording(small.runner, overlap_depth=depth, decode_steps=passes, check_invariants=True)
        got = pressured.generate(prompts, sampling)
        m = pressured.scheduler.metrics
        assert m.retractions > 0 and (m.multi_step_decodes > 0) == (passes > 1), depth
        assert pressured.replayed, depth  # a request retracted mid-output was re-admitted with its outputs
        assert [o.outputs[0].token_ids for o in got] == [c.token_ids for c in want], depth
        assert_pages_all_back(pressured)


def test_bad_constraints_are_refused_by_field_before_anything_runs(llm: LLM) -> None:
    prompt = [chat(llm, "Hi.")]
    cases = [
        (pb.Constraint(json_schema="not json"), "sampling.constraint.json_schema", "not valid JSON"),
        (pb.Constraint(json_schema="   "), "sampling.constraint.json_schema", "is empty"),
        (pb.Constraint(json_schema="[1]"), "sampling.constraint.json_schema", "must be a JSON object"),
        (pb.Constraint(json_schema='{"type": 5}'), "sampling.constraint.json_schema", "cannot be compiled"),
        (pb.Constraint(json_schema='{"$ref": "#/nope"}'), "sampling.constraint.json_schema", "cannot be compiled"),
        (pb.Constraint(regex="[a-"), "sampling.constraint.regex", "Unclosed '['"),
        (pb.Constraint(regex=""), "sampling.constraint.regex", "is empty"),
        (pb.Constraint(ebnf="root ::= foo"), "sampling.constraint.ebnf", 'Rule "foo" is not defined'),
        (pb.Constraint(choice=pb.Choice()), "sampling.constraint.choice.values", "is empty"),
        (pb.Constraint(choice=pb.Choice(values=["a", ""])), "sampling.constraint.choice.values[1]", "is empty"),
        (pb.Constraint(json_object=False), "sampling.constraint.json_object", "must be true"),
        (pb.Constraint(), "sampling.constraint", "set one of"),
    ]
    for constraint, field, words in cases:
        with pytest.raises(FieldError) as info:
            llm.generate(prompt, pb.SamplingParams(constraint=constraint))
        assert (info.value.field, info.value.message.startswith(field)) == (field, True), info.value.message
        assert words in info.value.message, info.value.message
        assert "/project/cpp" not in info.value.message  # xgrammar's log prefix is cut
    regex = pb.Constraint(regex="[0-9]+")
    for extra, field in ((dict(ignore_eos=True), "sampling.ignore_eos"), (dict(min_tokens=2), "sampling.min_tokens")):
        with pytest.raises(FieldError) as info:
            llm.generate(prompt, pb.SamplingParams(constraint=regex, **extra))
        assert info.value.field == field
    assert_pages_all_back(llm)


def test_a_model_without_a_tokenizer_refuses_constraints(tmp_path: Path, default_model_dir: Path) -> None:
    bare = build_tiny_llama(tmp_path / "bare", tmp_path / "no-tokenizer", 256)  # config and weights only
    llm = LLM(str(bare), max_slots=4, max_total_tokens=1024)
    for _ in range(2):  # the refusal is remembered, and says the same each time
        with pytest.raises(FieldError) as info:
            llm.generate([[5, 6, 7]], pb.SamplingParams(constraint=pb.Constraint(regex="[a-z]+")))
        assert info.value.field == "sampling.constraint"
        assert "the model has no tokenizer" in info.value.message
    (out,) = llm.generate([[5, 6, 7]], pb.SamplingParams(max_tokens=2, ignore_eos=True))  # it still serves
    assert len(out.outputs[0].token_ids) == 2


def test_each_distinct_constraint_compiles_once_and_only_constrained_rows_are_masked(tiny: LLM) -> None:
    grammars = tiny.runner.grammars()
    before = grammars.size
    for _ in range(3):
        tiny.generate([[5, 6, 7]], pb.SamplingParams(max_tokens=6, temperature=0.0,
                                                     constraint=pb.Constraint(regex="[a-c]{2}")))
    assert grammars.size == before + 1
    grammar = grammars.get(Constraint("regex", "[a-c]{2}"))
    assert grammars.get(Constraint("regex", "[a-c]{2}")) is grammar
    table = ConstraintTable(4, VOCAB, torch.device("cpu"))
    slots = np.array([0, 2, 3])
    assert table.mask(slots) is None and table._host is None  # nothing constrained: no bitmask work at all
    table.admit(1, grammar)
    assert table.mask(slots) is None  # slot 1 samples in no row
    logits = torch.zeros(2, VOCAB)
    apply = table.mask(np.array([0, 1]))
    assert apply is not None
    apply(logits)
    allowed = torch.isfinite(logits).sum(dim=1).tolist()
    assert allowed[0] == VOCAB and 0 < allowed[1] < VOCAB  # row 0 untouched, row 1 masked
    first = int(torch.isfinite(logits[1]).nonzero()[0])
    table.sampled(np.array([0, 1]), torch.tensor([7, first]))
    table.admit(1, None)
    assert table.mask(np.array([0, 1])) is None and table.num_constrained == 0


def test_the_staged_device_path_masks_and_accepts_as_the_direct_one(tiny: LLM) -> None:
    """The CUDA path (packed bitmask rows scattered to their logits rows, tokens accepted at the next
    mask), run on the CPU: every step's masks and the seeded outputs are the direct path's."""
    grammar = tiny.runner.grammars().get(Constraint("json_schema", json.dumps(SCHEMAS[4])))
    tables = [ConstraintTable(6, VOCAB, torch.device("cpu"), staged=s) for s in (False, True)]
    for table in tables:
        table.admit(1, grammar)
        table.admit(4, grammar, tiny.tokenizer.encode('{"items": [{"sku": "ab'))
    slots = np.array([0, 4, 2, 1])  # constrained rows 1 and 3 among free ones
    for _ in range(12):
        masked = []
        for table in tables:
            logits = torch.zeros(4, VOCAB)
            apply = table.mask(slots)
            assert apply is not None
            apply(logits)
            masked.append(torch.isfinite(logits))
        assert torch.equal(masked[0], masked[1])
        assert masked[0][0].all() and masked[0][2].all() and not masked[0][1].all()
        tokens = torch.tensor([7, int(masked[0][1].nonzero()[-1]), 7, int(masked[0][3].nonzero()[0])])
        for table in tables:
            table.sampled(slots, tokens)
    staged = ConstraintTable(tiny.runner.config.max_slots, VOCAB, torch.device("cpu"), staged=True)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, 40000, 20).tolist() for _ in range(5)]
    sampling = [json_sampling(SCHEMAS[i], max_tokens=60, temperature=0.8, seed=i) for i in range(5)]
    want = [o.outputs[0].token_ids for o in tiny.generate(prompts, sampling)]
    direct, tiny.runner.constraints = tiny.runner.constraints, staged
    try:
        got = [o.outputs[0].token_ids for o in LLM(tiny.runner, overlap_depth=2).generate(prompts, sampling)]
    finally:
        tiny.runner.constraints = direct
    assert got == want


def test_admission_carries_the_grammar_and_the_outputs_to_replay() -> None:
    choice = Constraint.choice(['a "b"', "c\\d", "e\nf"])
    assert choice.spec == 'root ::= "a \\"b\\"" | "c\\\\d" | "e\\nf"'
    step = Step(step_id=1, admissions=[SlotParams(slot=2, constraint=choice, output_tokens=(9, 2**31 - 1)),
                                       SlotParams(slot=3)])
    back = decode_step(worker_pb2.StepCommand.FromString(encode_step(step).SerializeToString()))
    assert back.admissions == step.admissions
    with pytest.raises(ValueError, match="unknown constraint kind"):
        Constraint("grammar", "x")
