"""The OpenAI bodies of structured output, tools and reasoning, without a server: constraints from
response_format / structured_outputs / guided_* / tool_choice, the chat prompt the template renders
(tools, tool calls, chat_template_kwargs), and answers read into tool_calls and reasoning_content,
checked against the openai package's own types."""
from __future__ import annotations

import copy
import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmrpc.services.status import FieldError
from llmrpc.services.tokenizer.openai_api import Answer, ApiError, choice_outputs, parse_body
from llmrpc.services.tokenizer.reasoning import ReasoningParser
from llmrpc.services.tokenizer.template import InputError, PromptBuilder
from llmrpc.services.tokenizer.tool_parsers import HermesParser, required_schema
from llmrpc.v1 import generation_pb2 as pb

CHAT = {"messages": [{"role": "user", "content": "x"}]}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
F = {"type": "function", "function": {"name": "f", "description": "F", "parameters": SCHEMA}}
G = {"type": "function", "function": {"name": "g"}}


def constraint(body: dict, chat: bool = True) -> tuple[pb.Constraint | None, str | None]:
    parsed = parse_body(body, chat)
    s = parsed.request.sampling
    return (s.constraint if s.HasField("constraint") else None), parsed.constraint_param


@pytest.mark.parametrize("extra, want, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     pb.Constraint(json_schema=json.dumps(SCHEMA)), "response_format"),
    ({"response_format": {"type": "json_object"}}, pb.Constraint(json_object=True), "response_format"),
    ({"response_format": {"type": "text"}}, None, None),
    ({"structured_outputs": {"json": SCHEMA}}, pb.Constraint(json_schema=json.dumps(SCHEMA)), "structured_outputs"),
    ({"structured_outputs": {"json": '{"type": "string"}'}}, pb.Constraint(json_schema='{"type": "string"}'),
     "structured_outputs"),
    ({"structured_outputs": {"regex": "a+"}}, pb.Constraint(regex="a+"), "structured_outputs"),
    ({"structured_outputs": {"choice": ["x", "y"]}}, pb.Constraint(choice=pb.Choice(values=["x", "y"])),
     "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, pb.Constraint(ebnf='root ::= "a"'), "structured_outputs"),
    ({"structured_outputs": {"json_object": True}}, pb.Constraint(json_object=True), "structured_outputs"),
    ({"structured_outputs": {"json": {}}}, pb.Constraint(json_schema="{}"), "structured_outputs"),  # any JSON
    ({"guided_json": SCHEMA}, pb.Constraint(json_schema=json.dumps(SCHEMA)), "guided_json"),
    ({"guided_regex": "b"}, pb.Constraint(regex="b"), "guided_regex"),
    ({"guided_choice": ["p"]}, pb.Constraint(choice=pb.Choice(values=["p"])), "guided_choice"),
    ({"guided_grammar": "g"}, pb.Constraint(ebnf="g"), "guided_grammar"),
    ({"tools": [F, G], "tool_choice": "required"},
     pb.Constraint(json_schema=json.dumps(required_schema([F["function"], G["function"]]))), "tools"),
    ({"tools": [F, G], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     pb.Constraint(json_schema=json.dumps(SCHEMA)), "tools"),
    ({"tools": [F, G]}, None, None),  # auto: parsed, not constrained
    ({"tools": [F], "tool_choice": "none"}, None, None),
])
def test_each_way_to_ask_for_a_constraint(extra: dict, want, param) -> None:
    assert constraint({**CHAT, **extra}) == (want, param)


def test_completions_take_vllms_constraints_too() -> None:
    assert constraint({"prompt": "x", "structured_outputs": {"choice": ["a"]}}, chat=False) == (
        pb.Constraint(choice=pb.Choice(values=["a"])), "structured_outputs")
    assert constraint({"prompt": "x", "guided_regex": "a"}, chat=False) == (pb.Constraint(regex="a"), "guided_regex")
    assert constraint({"prompt": "x", "response_format": {"type": "json_object"}}, chat=False) == (
        pb.Constraint(json_object=True), "response_format")
    with pytest.raises(ApiError) as err:
        parse_body({"prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a"}, chat=False)
    assert err.value.param == "guided_regex"


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "tools": [F], "tool_choice": "required"}, "tool_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [F], "tool_choice": {"type": "function", "function": {"name": "h"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [F, F]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tool_choice": "sometimes", "tools": [F]}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
])
def test_bad_or_conflicting_constraints_and_tools_name_the_parameter(extra: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_body({**CHAT, **extra}, chat=True)
    assert (err.value.status, err.value.param) == (400, param) and err.value.message.startswith(param)


@pytest.mark.parametrize("field, source, param", [
    ("sampling.constraint.json_schema", "response_format", "response_format"),
    ("sampling.constraint.regex", "structured_outputs", "structured_outputs"),
    ("sampling.constraint.json_schema", "tools", "tools"),
    ("sampling.constraint.choice.values[1]", "guided_choice", "guided_choice"),
    ("sampling.ignore_eos", "response_format", "ignore_eos"),
])
def test_a_refused_constraint_names_the_field_it_came_from(field: str, source: str, param: str) -> None:
    err = ApiError.from_error(FieldError(field, f"{field}: bad"), True, source)
    assert (err.status, err.param) == (400, param)


def test_messages_with_tool_calls_and_tool_results_reach_the_template(tokenizer) -> None:
    body = {**CHAT, "tools": [F], "chat_template_kwargs": {"enable_thinking": False, "greeting": "hello"},
            "messages": [
                {"role": "user", "content": "a?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]}
    prompt = parse_body(body, chat=True).prompt
    assert prompt.messages[1].template_dict() == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}
    assert prompt.messages[2].template_dict() == {"role": "tool", "content": "2", "tool_call_id": "call_1"}
    assert prompt.tools == (F,)
    # A small Hermes-style template that shows what it was given.
    custom = copy.copy(tokenizer)
    custom.chat_template = (
        "{{ greeting }}|{{ enable_thinking }}|{% for t in tools %}<tool>{{ t.function.name }}</tool>{% endfor %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
        "</tool_call>{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}")
    rendered = PromptBuilder(custom).render_chat(prompt.messages, False, prompt.tools, prompt.template_kwargs)
    assert rendered == ('hello|False|<tool>f</tool>[user]a?[assistant]<tool_call>f {"a": 1}</tool_call>'
                        "[tool]2(call_1)")
    with pytest.raises(InputError) as err:  # a parameter of apply_chat_template is no template variable
        PromptBuilder(custom).render_chat(prompt.messages, template_kwargs={"tokenize": True})
    assert err.value.field == "chat_template_kwargs.tokenize"


def response(text: str, finish: int | None = None, index: int = 0) -> pb.GenerateResponse:
    r = pb.GenerateResponse(index=index, text=text)
    if finish is not None:
        r.finish_reason = finish
        r.usage.CopyFrom(pb.Usage(prompt_tokens=3, completion_tokens=5))
    return r


def test_answers_carry_tool_calls_and_reasoning_as_openai_types() -> None:
    parsed = parse_body({**CHAT, "tools": [F], "n": 2}, chat=True)
    outputs = choice_outputs(parsed, "<|im_start|>assistant\n", HermesParser(), ReasoningParser())
    text = '<think>Call f.</think>Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    whole = Answer(parsed, "m", str, outputs).complete([response(text, pb.FINISH_REASON_STOP, 0),
                                                         response("No.", pb.FINISH_REASON_STOP, 1)])
    ChatCompletion.model_validate(whole)
    first, second = (c["message"] for c in whole["choices"])
    assert (first["reasoning_content"], first["content"]) == ("Call f.", "Sure.")
    assert [(c["type"], c["function"]) for c in first["tool_calls"]] == [("function", {"name": "f",
                                                                                        "arguments": '{"a": 1}'})]
    assert [c["finish_reason"] for c in whole["choices"]] == ["tool_calls", "stop"]
    assert second == {"role": "assistant", "content": "No.", "reasoning_content": None}
    # streamed: role first, reasoning, content, then the call by name and its arguments in pieces
    answer = Answer(parsed, "m", str, outputs)
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    chunks = [answer.chunk(response(p, pb.FINISH_REASON_STOP if i == len(pieces) - 1 else None))
              for i, p in enumerate(pieces)]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Call f."
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    calls = [t for d in deltas for t in d.get("tool_calls", ())]
    assert calls[0]["function"]["name"] == "f" and calls[0]["id"].startswith("call_")
    assert "".join(t["function"]["arguments"] for t in calls) == '{"a": 1}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # nothing to read (no tools, no reasoning parser): the text as it is
    assert choice_outputs(parse_body(CHAT, chat=True), "", HermesParser(), None) is None
