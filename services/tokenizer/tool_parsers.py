"""Tool calls in a chat answer's text: the model's output → OpenAI `tool_calls`, whole or streamed.

A `ToolParser` reads the text generated so far and says which part of it is content and which
calls it holds. Parsers are prefix-stable: while the text grows, the content they return only
grows at its end, a call's name never changes once given, and its arguments only grow (they are
the model's own JSON text, a slice of the output, never re-serialized). `ToolCallStream` turns
the successive parses into OpenAI's deltas (a call's index, id, type and name first, then pieces
of its arguments), and the whole answer is the same stream pushed once, so a streamed call
reassembles to exactly the non-streamed one.

Formats (`--tool-call-parser`, or found in the chat template by `detect`):
- `hermes` (Hermes, Qwen2.5, Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number of blocks with text around them; a block whose JSON is broken stays content.
- `llama3_json` (Llama 3.1-3.3): the answer is JSON calls `{"name": ..., "parameters": {...}}`
  separated by `;`, optionally after `<|python_tag|>`; an answer that is not such calls is content.
The calls of `tool_choice` "required" and a named function are generated under a JSON-schema
constraint (`required_schema`, `named_schema`); `ArrayCalls` and `NamedCall` read those.

A call whose JSON breaks after its arguments began to stream stays a (broken) call in the stream,
while the whole answer gives that text as content: the stream cannot take back what it sent.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

_WS = " \t\r\n"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_SCALAR = re.compile(r"[-+0-9.eEa-z]+")
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes and OpenAI say arguments, Llama 3 parameters


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text; while streaming, possibly a prefix of it


@dataclass(frozen=True)
class Parse:
    content: str
    calls: list[ToolCall]


class ToolParser(Protocol):
    def parse(self, text: str, final: bool) -> Parse:
        """`text` is everything generated so far; `final`: no more will come."""
        ...


class _Broken(Exception):
    """Text that is not (the start of) the JSON a call needs."""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    m = _STRING.match(text, i)
    return m.end() if m is not None else None


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value starting at `i` ends; None when the text ends first."""
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    m = _SCALAR.match(text, i)
    if m is None:
        raise _Broken
    return None if m.end() == len(text) else m.end()


@dataclass
class _Object:
    """A JSON object scanned from its `{`: each key's value span (end None: still open) and the object's end."""

    start: int
    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None


def _scan_object(text: str, i: int) -> _Object:
    """The object whose `{` is at `i`, as far as the text goes; _Broken when it cannot be JSON."""
    obj, n = _Object(i), len(text)
    j = _skip_ws(text, i + 1)
    if j < n and text[j] == "}":
        obj.end = j + 1
        return obj
    while j < n:
        if text[j] != '"':
            raise _Broken
        key_end = _string_end(text, j)
        if key_end is None:
            return obj
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if j >= n:
            return obj
        if text[j] != ":":
            raise _Broken
        j = _skip_ws(text, j + 1)
        if j >= n:
            return obj
        value_end = _value_end(text, j)
        obj.fields[key] = (j, value_end)
        if value_end is None:
            return obj
        j = _skip_ws(text, value_end)
        if j >= n:
            return obj
        if text[j] == "}":
            obj.end = j + 1
            return obj
        if text[j] != ",":
            raise _Broken
        j = _skip_ws(text, j + 1)
    return obj


def _call_of(text: str, obj: _Object) -> ToolCall | None:
    """The call an object (complete or not) shows so far; None until its name is known, or when it is no call."""
    span = obj.fields.get("name")
    if span is None or span[1] is None:
        return None
    name = json.loads(text[span[0]:span[1]])
    if not isinstance(name, str):
        raise _Broken
    args = next((obj.fields[k] for k in ARGUMENT_KEYS if k in obj.fields), None)
    if obj.end is not None:
        try:
            json.loads(text[obj.start:obj.end])
        except ValueError:
            raise _Broken from None
        if args is None:
            return ToolCall(name, "{}")
    if args is None:
        return ToolCall(name, "")
    start, end = args
    if text[start] == '"':  # arguments sent as a JSON string holding the JSON: given once whole
        return ToolCall(name, json.loads(text[start:end]) if end is not None else "")
    if text[start] != "{":
        raise _Broken
    return ToolCall(name, text[start:end if end is not None else len(text)])


def _scan_calls(text: str, i: int, separators: str, final: bool) -> tuple[list[ToolCall], bool]:
    """Objects from `i` on, between `separators` and whitespace: (the calls so far, whether it is all calls)."""
    calls: list[ToolCall] = []
    while True:
        i = _skip_ws(text, i)
        while i < len(text) and text[i] in separators:
            i = _skip_ws(text, i + 1)
        if i >= len(text):
            return calls, True
        if text[i] != "{":
            return calls, False
        try:
            obj = _scan_object(text, i)
            call = _call_of(text, obj)
        except (_Broken, ValueError):  # ValueError: json.loads of a span that is no JSON value
            return calls, False
        if obj.end is None:
            if call is not None and not final:
                calls.append(call)
            return calls, not final
        if call is None:  # a complete object without a name: no call
            return calls, False
        calls.append(call)
        i = obj.end


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag` (they wait for the next piece)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class HermesParser:
    """`<tool_call>{...}</tool_call>` blocks anywhere in the text."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parse:
        content: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                tail = text[pos:]
                content.append(tail if final else tail[:len(tail) - _held_back(tail, self.OPEN)])
                break
            content.append(text[pos:start])
            body = start + len(self.OPEN)
            end = text.find(self.CLOSE, body)
            found, whole = _scan_calls(text[:end] if end >= 0 else text, body, "", final or end >= 0)
            if end < 0:  # still open: a call so far, or (at the end) the block as it stands
                if final and not (whole and len(found) == 1):
                    content.append(text[start:])
                elif whole:  # (broken JSON waits, unsent, for the block's end)
                    calls.extend(found[:1])
                break
            if whole and len(found) == 1:
                calls.append(found[0])
            else:
                content.append(text[start:end + len(self.CLOSE)])
            pos = end + len(self.CLOSE)
        return Parse("".join(content), calls)


class Llama3JsonParser:
    """Llama 3's JSON calls: the whole answer (after text ending in `<|python_tag|>`, if any) is calls."""

    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parse:
        tag = text.find(self.TAG)
        if tag >= 0:
            prefix, start = text[:tag], tag + len(self.TAG)
        elif text.lstrip(_WS).startswith("{"):
            prefix, start = "", 0
        elif final:
            return Parse(text, [])
        elif self.TAG.startswith(text.lstrip(_WS)):
            return Parse("", [])  # nothing yet says whether this is a call
        else:  # content, unless the tag follows: its first characters wait
            return Parse(text[:len(text) - _held_back(text, self.TAG)], [])
        calls, whole = _scan_calls(text, start, ";", final)
        if not whole:
            return Parse(text, [])
        return Parse(prefix, calls)


class ArrayCalls:
    """tool_choice "required": the output is a JSON array of {"name", "arguments"} (`required_schema`)."""

    def parse(self, text: str, final: bool) -> Parse:
        calls, whole = _scan_calls(text, 0, "[,]", final)
        return Parse("", calls) if whole or not final else Parse(text, [])


@dataclass(frozen=True)
class NamedCall:
    """A named tool_choice: the whole output is the arguments of function `name` (`named_schema`)."""

    name: str

    def parse(self, text: str, final: bool) -> Parse:
        return Parse("", [ToolCall(self.name, text.lstrip(_WS))])


PARSERS: dict[str, Callable[[], ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}
TOOL_PARSER_CHOICES = ("auto", *PARSERS)


def detect(chat_template: str | None) -> str:
    """The parser a chat template's tool format needs: Llama 3's python tag, else Hermes' blocks (the usual one)."""
    template = chat_template or ""
    if "<|python_tag|>" in template or "<|eom_id|>" in template:
        return "llama3_json"
    return "hermes"


def parser_for(name: str, chat_template: str | None) -> ToolParser:
    """The `--tool-call-parser` NAME's parser; `auto` reads the chat template."""
    return PARSERS[detect(chat_template) if name == "auto" else name]()


# ---- the JSON schemas that enforce tool_choice "required" and a named function ----------------

def _parameters(function: dict[str, Any]) -> Any:
    return function.get("parameters") or {"type": "object", "properties": {}}


def named_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The named function's arguments (its parameters schema), as vLLM enforces a named tool_choice."""
    return _parameters(function)


def required_schema(functions: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """One or more calls (one when not `parallel`), each of one of `functions` with its own arguments."""
    one_of = [{"type": "object",
               "properties": {"name": {"type": "string", "enum": [f["name"]]}, "arguments": _parameters(f)},
               "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": one_of[0] if len(one_of) == 1 else {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ---- OpenAI's deltas -----------------------------------------------------------------------------

def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """One choice's text pieces → content pieces and OpenAI tool_call deltas; `calls` is the whole so far."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self._parser = parser
        self._max_calls = max_calls  # parallel_tool_calls false: the first call only
        self._text = ""
        self._sent_content = 0
        self.content = ""
        self.calls: list[dict[str, Any]] = []  # OpenAI's message.tool_calls entries

    def push(self, piece: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """The new content and the tool_call deltas (one per call that changed) for the next piece."""
        self._text += piece
        parse = self._parser.parse(self._text, final)
        new_content = parse.content[self._sent_content:]
        self._sent_content = len(parse.content)
        self.content += new_content
        deltas = []
        for index, call in enumerate(parse.calls[:self._max_calls]):
            if index == len(self.calls):
                self.calls.append({"id": call_id(), "type": "function",
                                   "function": {"name": call.name, "arguments": ""}})
                delta: dict[str, Any] = {"index": index, "id": self.calls[index]["id"], "type": "function",
                                         "function": {"name": call.name, "arguments": ""}}
            else:
                delta = {"index": index, "function": {"arguments": ""}}
            function = self.calls[index]["function"]
            more = call.arguments[len(function["arguments"]):]
            if more or "id" in delta:
                function["arguments"] += more
                delta["function"]["arguments"] = more
                deltas.append(delta)
        return new_content, deltas
