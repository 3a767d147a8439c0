"""Structured output, tool calls and reasoning through the official `openai` client, against a real
`llmrpc serve` (the default model, `--reasoning-parser qwen3`): the constraint holds on what the model
generates, the answer is read into tool_calls / reasoning_content, a streamed answer reassembles to
the whole one, and bad requests are 400s naming the parameter while the server serves on.
"""
from __future__ import annotations

import json
import re
import urllib.request

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import start_stack

pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
    "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
    "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    s = start_stack(tmp_path_factory.mktemp("structured"), default_model_dir, "--reasoning-parser", "qwen3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def ask(stack, client, model):
    """One chat answer: through the openai client, or streamed (every chunk's JSON validated as a
    ChatCompletionChunk) and reassembled by the client's own ChatCompletionStreamState."""

    def ask(stream: bool = False, **body) -> ChatCompletion:
        body = {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 48, **body}
        if not stream:
            extra = {k: body.pop(k) for k in ("structured_outputs", "chat_template_kwargs") if k in body}
            raw = client.chat.completions.with_raw_response.create(**body, extra_body=extra or None)
            return ChatCompletion.model_validate(json.loads(raw.http_response.text))
        state = ChatCompletionStreamState()
        request = urllib.request.Request(stack.http + "/v1/chat/completions",
                                         json.dumps({**body, "stream": True}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            events = [line.removeprefix(b"data: ").decode() for line in r.read().splitlines()
                      if line.startswith(b"data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(event)))
        return state.get_final_completion()

    return ask


def calls_of(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]


def test_json_schema_and_json_object_responses_parse_and_validate(ask) -> None:
    answers = [ask(stream, response_format={"type": "json_schema", "json_schema": {
        "name": "city", "schema": CITY, "strict": True}}) for stream in (False, True)]
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY)
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    answer = ask(response_format={"type": "json_object"},
                  messages=[{"role": "user", "content": 'Reply with a JSON object {"answer": ...}: what is 2+2?'}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_structured_outputs_on_completions_and_chat(client, model, ask) -> None:
    out = client.completions.create(model=model, prompt="The best color is", max_tokens=8, temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    Completion.model_validate(out.model_dump())
    assert out.choices[0].text in ("red", "green", "blue") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=model, prompt="A year:", max_tokens=8, temperature=0,
                                    extra_body={"guided_regex": "[12][0-9]{3}"})
    assert re.fullmatch("[12][0-9]{3}", out.choices[0].text)
    answer = ask(structured_outputs={"regex": "(yes|no)"})
    assert answer.choices[0].message.content in ("yes", "no")


def test_tool_choice_required_is_a_valid_call_streamed_the_same(ask) -> None:
    whole, streamed = (ask(stream, tools=[WEATHER, TIME], tool_choice="required") for stream in (False, True))
    for answer in (whole, streamed):
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and all(c.id.startswith("call_") and c.type == "function"
                                                 for c in choice.message.tool_calls)
        for name, arguments in calls_of(choice):
            tool = next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)
            jsonschema.validate(arguments, tool["function"]["parameters"])
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in streamed.choices[0].message.tool_calls]


def test_named_tool_choice_none_and_auto(ask) -> None:
    named = ask(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    [(name, arguments)] = calls_of(named.choices[0])
    assert name == "get_time" and named.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(arguments, TIME["function"]["parameters"])
    # none: the answer is text, whatever it says
    plain = ask(tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    # auto reads the model's own <tool_call> blocks (here forced by a regex, as a model trained on them writes)
    forced = {"regex": r'On it\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
                       r'"unit": "celsius"\}\}</tool_call>'}
    for stream in (False, True):
        auto = ask(stream, tools=[WEATHER], structured_outputs=forced, max_tokens=64)
        choice = auto.choices[0]
        assert choice.message.content == "On it. " and choice.finish_reason == "tool_calls"
        assert calls_of(choice) == [("get_weather", {"city": "Paris", "unit": "celsius"})] or calls_of(choice) == [
            ("get_weather", {"city": "Rome", "unit": "celsius"})]


def test_reasoning_content_is_split_from_the_answer(ask) -> None:
    """The default model does not think: a regex makes it write <think>…</think> first, as Qwen3 does."""
    forced = {"regex": r"<think>[a-z]{1,8}( [a-z]{1,8}){0,3}</think>\n\n[A-Z][a-z]{1,12}\."}
    whole, streamed = (ask(stream, structured_outputs=forced, max_tokens=40) for stream in (False, True))
    message = whole.choices[0].message
    assert re.fullmatch(r"[a-z]{1,8}( [a-z]{1,8}){0,3}", message.reasoning_content)
    assert re.fullmatch(r"[A-Z][a-z]{1,12}\.", message.content)
    assert (streamed.choices[0].message.reasoning_content, streamed.choices[0].message.content) == (
        message.reasoning_content, message.content)
    # no <think> in the answer: all content, reasoning_content null
    plain = ask(max_tokens=6)
    assert plain.choices[0].message.reasoning_content is None and plain.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),  # refused where the grammar is compiled, named here by the field it came from
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
      "tool_choice": "required"}, "tools"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
])
def test_bad_requests_are_400s_naming_the_parameter_and_the_server_serves_on(ask, body, param) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        ask(**body)
    assert bad.value.status_code == 400 and bad.value.body["param"] == param, bad.value.body
    assert ask(max_tokens=2).choices[0].message.content  # the next request is served
