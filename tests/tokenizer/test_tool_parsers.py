"""Tool calls read from model text (tool_parsers.py) and reasoning split from the answer (reasoning.py),
whole and streamed in pieces of every size: a stream always reassembles to the whole answer's reading."""
from __future__ import annotations

import json
import random

import pytest

from llmrpc.services.tokenizer.reasoning import ReasoningParser, ReasoningSplitter, reasoning_parser
from llmrpc.services.tokenizer.tool_parsers import (ArrayCalls, HermesParser, Llama3JsonParser, NamedCall, Parse,
                                                    ToolCall, ToolCallStream, detect, required_schema)


def pieces(text: str, seed: int) -> list[str]:
    """`text` cut at random places into pieces of 1 to 5 characters."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        out.append(text[i:i + k])
        i += k
    return out


def streamed(parser, text: str, seed: int) -> tuple[str, list[dict]]:
    """The content and the calls OpenAI's client rebuilds from the deltas of `text` streamed in pieces."""
    stream, content, calls = ToolCallStream(parser), "", {}
    for i, piece in enumerate([*pieces(text, seed), ""]):
        new, deltas = stream.push(piece, final=i == len(pieces(text, seed)))
        content += new
        for d in deltas:
            if "id" in d:  # the first delta of a call names it; later ones carry only arguments
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["name"]
                calls[d["index"]] = {"id": d["id"], "type": "function",
                                     "function": {"name": d["function"]["name"], "arguments": ""}}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    assert list(calls.values()) == stream.calls
    return content, stream.calls


def whole(parser, text: str) -> tuple[str, list[dict]]:
    stream = ToolCallStream(parser)
    content, _ = stream.push(text, final=True)
    return content, stream.calls


def functions(calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
          '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris \\"CET\\" {}"}}'
          '</tool_call> Then <tool_call>{"name": broken}</tool_call> done.')


def test_hermes_reads_several_calls_and_leaves_text_and_broken_json_as_content() -> None:
    assert HermesParser().parse(HERMES, final=True) == Parse(
        'Let me check. \n Then <tool_call>{"name": broken}</tool_call> done.',
        [ToolCall("get_weather", '{"city": "Paris", "days": [1, 2]}'),
         ToolCall("get_time", '{"tz": "Europe/Paris \\"CET\\" {}"}')])
    for args in ('{"city": "Paris", "days": [1, 2]}', '{"tz": "Europe/Paris \\"CET\\" {}"}'):
        json.loads(args)  # the model's own JSON text, valid as it stands
    # no arguments: {}; arguments sent as a JSON string: that string
    assert HermesParser().parse('<tool_call>{"name": "now"}</tool_call>', True).calls == [ToolCall("now", "{}")]
    assert HermesParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', True).calls == [
        ToolCall("f", '{"a": 1}')]
    # no calls at all: the text as it is; a call cut short at the end: content too
    assert HermesParser().parse("No tools needed <tool", True) == Parse("No tools needed <tool", [])
    cut = 'Hi <tool_call>{"name": "f", "arguments": {"a": '
    assert HermesParser().parse(cut, True) == Parse(cut, [])


@pytest.mark.parametrize("seed", range(20))
def test_hermes_streams_to_the_same_calls_and_content(seed: int) -> None:
    content, calls = streamed(HermesParser(), HERMES, seed)
    want_content, want_calls = whole(HermesParser(), HERMES)
    assert content == want_content and functions(calls) == functions(want_calls)


def test_hermes_stream_names_a_call_before_its_arguments_end_and_holds_back_a_split_tag() -> None:
    stream = ToolCallStream(HermesParser())
    assert stream.push("Sure <tool_") == ("Sure ", [])  # "<tool_" may open a call: held back
    assert stream.push('call>{"name": "f", "argu') == ("", [
        {"index": 0, "id": stream.calls[0]["id"], "type": "function", "function": {"name": "f", "arguments": ""}}])
    assert stream.calls[0]["id"].startswith("call_")
    assert stream.push('ments": {"a": [1,') == ("", [{"index": 0, "function": {"arguments": '{"a": [1,'}}])
    assert stream.push(' 2]}}</tool_call>') == ("", [{"index": 0, "function": {"arguments": " 2]}"}}])
    assert stream.push("<tool", final=True) == ("<tool", [])


LLAMA = '<|python_tag|>{"name": "search", "parameters": {"q": "llmrpc; grpc"}}; {"name": "calc", "parameters": {}}'


def test_llama3_json_reads_calls_after_the_python_tag_or_a_bare_object() -> None:
    calls = [ToolCall("search", '{"q": "llmrpc; grpc"}'), ToolCall("calc", "{}")]
    assert Llama3JsonParser().parse(LLAMA, True) == Parse("", calls)
    assert Llama3JsonParser().parse(LLAMA.removeprefix("<|python_tag|>"), True) == Parse("", calls)
    assert Llama3JsonParser().parse("Looking. " + LLAMA, True) == Parse("Looking. ", calls)
    # text that is no call, JSON without a name, broken JSON: content, whole
    for text in ("The answer is 4.", '{"answer": 4}', '{"name": "f", "parameters": {"x": }}', '{"name": "f"} and'):
        assert Llama3JsonParser().parse(text, True) == Parse(text, [])


@pytest.mark.parametrize("seed", range(10))
def test_llama3_json_streams_to_the_same_calls(seed: int) -> None:
    for text in (LLAMA, LLAMA.removeprefix("<|python_tag|>"), "Plain text, no tools."):
        content, calls = streamed(Llama3JsonParser(), text, seed)
        want_content, want_calls = whole(Llama3JsonParser(), text)
        assert content == want_content and functions(calls) == functions(want_calls)


def test_constrained_calls_required_array_and_named_function() -> None:
    text = '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "]"}}]'
    assert ArrayCalls().parse(text, True) == Parse("", [ToolCall("a", '{"x": 1}'), ToolCall("b", '{"y": "]"}')])
    assert NamedCall("f").parse(' {"x": 1}', True) == Parse("", [ToolCall("f", '{"x": 1}')])
    for seed in range(5):
        assert functions(streamed(ArrayCalls(), text, seed)[1]) == [("a", '{"x": 1}'), ("b", '{"y": "]"}')]
        assert functions(streamed(NamedCall("f"), '{"x": [1, 2]}', seed)[1]) == [("f", '{"x": [1, 2]}')]
    # parallel_tool_calls false: the first call only, and the schema allows one
    one = ToolCallStream(ArrayCalls(), max_calls=1)
    one.push(text, final=True)
    assert functions(one.calls) == [("a", '{"x": 1}')]
    fs = [{"name": "a", "parameters": {"type": "object"}}, {"name": "b"}]
    schema = required_schema(fs, parallel=False)
    assert schema["minItems"] == schema["maxItems"] == 1
    assert [o["properties"]["name"] for o in schema["items"]["anyOf"]] == [{"type": "string", "enum": ["a"]},
                                                                          {"type": "string", "enum": ["b"]}]
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_auto_detects_the_format_from_the_chat_template() -> None:
    assert detect("{{ '<|python_tag|>' }}{{ '<|eom_id|>' }}") == "llama3_json"
    assert detect("<tool_call>\n{{ tool_call | tojson }}\n</tool_call>") == "hermes"
    assert detect(None) == "hermes"


# ---- reasoning -------------------------------------------------------------------------------

THINKING = "<think>\nThe user wants 2+2.\nThat is 4.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize("seed", range(20))
def test_reasoning_splits_the_same_in_any_pieces(seed: int) -> None:
    for text, opened in ((THINKING, False), (THINKING.removeprefix("<think>"), True), ("Just 4.", False),
                         ("<think>cut short by max_tokens", False), ("<thi", False), (" 4 <think>", False)):
        want = ReasoningSplitter(opened).push(text, final=True)
        splitter, got = ReasoningSplitter(opened), ("", "")
        parts = pieces(text, seed)
        for i, piece in enumerate(parts):
            r, c = splitter.push(piece, final=i == len(parts) - 1)
            got = (got[0] + r, got[1] + c)
        assert got == want, text


def test_reasoning_tags_split_between_two_pieces() -> None:
    splitter = ReasoningSplitter(thinking=False)
    assert splitter.push("<thi") == ("", "")  # may open <think>: held
    assert splitter.push("nk>Two and two") == ("Two and two", "")
    assert splitter.push(" make four.</th") == (" make four.", "")  # "</th" may close it: held
    assert splitter.push("ink>\n\nFour") == ("", "Four")
    assert splitter.push(".", final=True) == ("", ".")
    assert ReasoningSplitter(thinking=False).push(THINKING, True) == ("The user wants 2+2.\nThat is 4.",
                                                                      "The answer is 4.")
    assert ReasoningSplitter(thinking=False).push("Four.", True) == ("", "Four.")


def test_reasoning_parsers_read_the_prompt_and_the_template() -> None:
    qwen3, r1 = reasoning_parser("qwen3", None), reasoning_parser("deepseek_r1", None)
    assert qwen3 == ReasoningParser() and r1 == ReasoningParser(always=True)
    # a generation prompt that opens <think> (R1, Qwen3 thinking models): the answer starts in the reasoning
    assert qwen3.splitter("<|im_start|>assistant\n<think>\n").push("Hmm.</think>4", True) == ("Hmm.", "4")
    # Qwen3 with enable_thinking false closes the block in the prompt: the answer is all content
    assert qwen3.splitter("<|im_start|>assistant\n<think>\n\n</think>\n\n").push("4", True) == ("", "4")
    assert r1.splitter("<|Assistant|>").push("Hmm.</think>4", True) == ("Hmm.", "4")
    assert reasoning_parser("auto", "{% if enable_thinking %}<think>{% endif %}") == ReasoningParser()
    assert reasoning_parser("auto", "{{ messages }}") is None and reasoning_parser("none", "<think>") is None
