"""The OpenAI wire format: JSON request bodies → GenerateRequest, GenerateResponse → JSON answers.

Pure translation, no I/O: http_server.py owns the sockets. A body is parsed by the pydantic
model of its endpoint (`CompletionBody`, `ChatBody`): JSON types are strict (a string is not a
number), and a bad field raises `ApiError` whose `param` is the validation error's location,
which becomes OpenAI's error body with HTTP 400. Value ranges are the scheduler's to check
(services/scheduler/validation.py): its refusal comes back as a google.rpc.BadRequest whose
field path `ApiError.from_error` turns into the OpenAI parameter (`sampling.top_p` → `top_p`).

The sampling fields OpenAI lacks are accepted under vLLM's names (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids), so clients written for vLLM work
unchanged. OpenAI fields that would change the answer and that llmrpc does not implement
(logit_bias, audio, ...) are refused by name unless they hold their neutral value;
informational ones (user, metadata, store, service_tier, ...) and unknown fields are ignored.

Structured output: OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar) and its older `guided_*` fields each become
SamplingParams.constraint; at most one may be given, and the scheduler's refusal of a grammar
(`sampling.constraint.json_schema`) comes back naming the field the client used. Chat requests
also take `tools` and `tool_choice` (auto, none, required, a named function; the last two
enforced by a JSON-schema constraint, tool_parsers.py) and `chat_template_kwargs`; the chat is
rendered by the front door (`ChatPrompt`, template.py), and the answer's text is read back into
`reasoning_content`, `content` and `tool_calls` by `ChoiceOutput` (reasoning.py, tool_parsers.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

import grpc
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, ValidationError
from pydantic import ValidationInfo, field_validator, model_validator

from llmrpc.services.contract import FINISH_REASON_NAMES
from llmrpc.services.status import StatusError
from llmrpc.services.tokenizer import tool_parsers
from llmrpc.services.tokenizer.reasoning import ReasoningParser, ReasoningSplitter
from llmrpc.services.tokenizer.template import Message
from llmrpc.services.tokenizer.tool_parsers import ToolCallStream, ToolParser
from llmrpc.v1 import generation_pb2

# OpenAI's defaults where they differ from ours: a completion is 16 tokens unless asked.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 429: "rate_limit_error"}
# The request's input, whatever form it took, is OpenAI's prompt (or messages, for chat).
_INPUT_FIELDS = frozenset({"input", "text", "tokens", "chat"})


@dataclass
class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_error(cls, error: StatusError, chat: bool, constraint_param: str | None = None) -> ApiError:
        """A service's status as HTTP; the parameter is the field its BadRequest details name
        (`sampling.constraint.*`: `constraint_param`, the body field the constraint came from)."""
        return cls(HTTP_STATUS.get(error.code, 500), error.message, _param_of(error.field, chat, constraint_param))

    @classmethod
    def from_validation(cls, error: ValidationError) -> ApiError:
        """The first problem pydantic found, naming the top-level body field it lies in."""
        first = error.errors(include_url=False)[0]
        loc = first["loc"]
        text = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        if not loc:
            kinds = {"model_type": "the request body must be a JSON object", "json_invalid": "the request body is not valid JSON"}
            return cls(400, kinds.get(first["type"], text))
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        # Our validators' texts continue the field's name; pydantic's own are sentences.
        return cls(400, f"{path} {text}" if first["type"] == "value_error" else f"{path}: {text}", str(loc[0]))


def _param_of(field: str | None, chat: bool, constraint_param: str | None = None) -> str | None:
    """The OpenAI parameter of one of our request field paths (`sampling.stop[1]` → `stop`)."""
    if field is None:
        return None
    head, _, rest = field.partition(".")
    head = head.split("[", 1)[0]
    if head in _INPUT_FIELDS:
        return "messages" if chat else "prompt"
    if head != "sampling":
        return head
    name = rest.split("[", 1)[0].split(".", 1)[0]
    if name == "constraint":
        return constraint_param or name
    return "top_logprobs" if chat and name == "logprobs" else name


# ---- reading a request body -----------------------------------------------------

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # what an int32 / sint32 proto field holds
_SAMPLING_FIELDS = frozenset(generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


def _neutral(*values: object) -> AfterValidator:
    """For a field llmrpc does not implement: only absent, null or one of `values` (which change nothing)."""

    def check(value: object) -> object:
        if value is not None and value not in values:
            raise ValueError("is not supported by this server")
        return value

    return AfterValidator(check)


def _stop_list(value: object) -> object:
    """OpenAI's stop: one string or a list of them; none may be empty."""
    stops = [value] if isinstance(value, str) else value
    if isinstance(stops, list) and any(s == "" for s in stops):
        raise ValueError("must not hold an empty string")
    return stops


def _one_prompt(value: object) -> object:
    """OpenAI's prompt as one input: a string or token ids (a batch of one is unwrapped)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    tokens = isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not (isinstance(value, str) or tokens):
        raise ValueError("must be a string or a list of token ids (batches of prompts are not supported)")
    return value


def _text_content(value: object) -> object:
    """A message's content as one string: null is empty, a list of text parts is joined."""
    if value is None:
        return ""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise ValueError("may only hold text parts")
        return "".join(p["text"] for p in value)
    return value


class _Strict(BaseModel):
    # JSON types as sent (no "0.5" for 0.5); fields llmrpc does not know are ignored, as vLLM does.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Exact(_Strict):
    # Where an unknown key could change the answer (a grammar option), it is refused, not ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def template_dict(self) -> dict[str, Any]:
        """The call as chat templates read it: arguments as an object (they write it as JSON themselves)."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):  # not an object: left as the text it is
            arguments = self.function.arguments
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Strict):
    role: str
    content: Annotated[str, BeforeValidator(_text_content)] = ""
    name: str | None = None
    tool_call_id: str | None = None  # role tool: the call it answers
    tool_calls: list[MessageToolCall] | None = None  # role assistant: the calls it made

    def message(self) -> Message:
        return Message(self.role, self.content, self.name, self.tool_call_id,
                       tuple(c.template_dict() for c in self.tool_calls or ()))


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None  # calls are always generated under their schema when enforced


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: Annotated[dict[str, Any] | bool, Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("of type json_schema needs json_schema: {name, schema}")
        return self

    def constraint(self) -> generation_pb2.Constraint | None:
        if self.type == "json_object":
            return generation_pb2.Constraint(json_object=True)
        if self.type == "json_schema":
            assert self.json_schema is not None
            return generation_pb2.Constraint(json_schema=json.dumps(self.json_schema.schema_))
        return None


def _schema_text(schema: dict[str, Any] | bool | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


class StructuredOutputs(_Exact):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar (or json_object)."""

    json_: Annotated[dict[str, Any] | bool | str | None, Field(alias="json")] = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]  # an empty one is given (and refused downstream)
        if len(given) != 1:
            raise ValueError("must set exactly one of json, regex, choice, grammar or json_object")
        return self

    def constraint(self) -> generation_pb2.Constraint:
        if self.json_ is not None:
            return generation_pb2.Constraint(json_schema=_schema_text(self.json_))
        if self.regex is not None:
            return generation_pb2.Constraint(regex=self.regex)
        if self.choice is not None:
            return generation_pb2.Constraint(choice=generation_pb2.Choice(values=self.choice))
        if self.grammar is not None:
            return generation_pb2.Constraint(ebnf=self.grammar)
        return generation_pb2.Constraint(json_object=True)


class _Body(_Strict):
    """The fields both endpoints take. Names that are SamplingParams fields map onto them as they are."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Int32 | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    n: Int32 | None = None
    seed: int | None = None
    stop: Annotated[list[str], BeforeValidator(_stop_list)] | None = None
    # vLLM's sampling extensions
    top_k: Int32 | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    min_tokens: Int32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int32] | None = None
    # structured output: OpenAI's (vLLM takes it on completions too), vLLM's extra body and its older names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: Annotated[Any, _neutral()] = None
    # OpenAI's, not implemented here
    logit_bias: Annotated[Any, _neutral({})] = None

    @field_validator("seed")
    @classmethod
    def _unsigned_seed(cls, seed: int | None) -> int | None:
        return None if seed is None else seed % 2**64  # OpenAI allows negative seeds; the engine's are unsigned

    def sampling(self) -> generation_pb2.SamplingParams:
        """The SamplingParams of this body: every field set here, under its name there; unset stays unset."""
        s = generation_pb2.SamplingParams()
        for name, value in self._sampling_values().items():
            if value is None:
                continue
            if isinstance(value, list):
                getattr(s, name).extend(value)
            else:
                setattr(s, name, value)
        return s

    def _sampling_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields if name in _SAMPLING_FIELDS}

    def constraints(self) -> list[tuple[str, generation_pb2.Constraint]]:
        """Each constraint the body asks for, with the field it came from."""
        found = []
        if self.response_format is not None and (c := self.response_format.constraint()) is not None:
            found.append(("response_format", c))
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.constraint()))
        if self.guided_json is not None:
            found.append(("guided_json", generation_pb2.Constraint(json_schema=_schema_text(self.guided_json))))
        if self.guided_regex is not None:
            found.append(("guided_regex", generation_pb2.Constraint(regex=self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", generation_pb2.Constraint(choice=generation_pb2.Choice(
                values=self.guided_choice))))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", generation_pb2.Constraint(ebnf=self.guided_grammar)))
        return found

    def generate_request(self) -> generation_pb2.GenerateRequest:
        raise NotImplementedError


class CompletionBody(_Body):
    """POST /v1/completions."""

    prompt: Annotated[str | list[Int32], BeforeValidator(_one_prompt)]
    logprobs: Int32 | None = None  # top-N alternatives per token, as SamplingParams.logprobs
    best_of: Int32 | None = None
    echo: Annotated[Any, _neutral(False)] = None
    suffix: Annotated[Any, _neutral("")] = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != (info.data.get("n") or 1):
            raise ValueError("other than n is not supported")
        return best_of

    def _sampling_values(self) -> dict[str, Any]:
        values = super()._sampling_values()
        if self.max_tokens is None:
            values["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        return values

    def generate_request(self) -> generation_pb2.GenerateRequest:
        request = generation_pb2.GenerateRequest(sampling=self.sampling(), stream=bool(self.stream))
        if isinstance(self.prompt, str):
            request.text = self.prompt
        else:
            request.tokens.ids.extend(self.prompt)
        return request


class ChatBody(_Body):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int32 | None = None  # OpenAI's newer name for max_tokens; it wins
    logprobs: bool | None = None
    top_logprobs: Int32 | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: extra variables for the chat template
    functions: Annotated[Any, _neutral([])] = None
    function_call: Annotated[Any, _neutral("none")] = None
    audio: Annotated[Any, _neutral()] = None
    modalities: Annotated[Any, _neutral(["text"])] = None
    web_search_options: Annotated[Any, _neutral()] = None
    reasoning_effort: Annotated[Any, _neutral()] = None
    verbosity: Annotated[Any, _neutral()] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    def _sampling_values(self) -> dict[str, Any]:
        values = super()._sampling_values()
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        values["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return values

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [t.function.name for t in tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"name the function {name!r} twice")
        return tools

    def generate_request(self) -> generation_pb2.GenerateRequest:
        chat = generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role=m.role, content=m.content)
                                             for m in self.messages])
        return generation_pb2.GenerateRequest(chat=chat, sampling=self.sampling(), stream=bool(self.stream))

    def constraints(self) -> list[tuple[str, generation_pb2.Constraint]]:
        found = super().constraints()
        calls = self.tool_calls()
        if calls is not None and calls.schema is not None:  # tool_choice required or named
            found.append(("tool_choice", generation_pb2.Constraint(json_schema=json.dumps(calls.schema))))
        return found

    def tool_calls(self) -> ToolCalls | None:
        """What the answer's tool calls are, from tools and tool_choice; None when there are none to read.

        With tool_choice none the tools are still rendered into the prompt (as vLLM does): the model
        knows them, and its text is the answer whatever it says.
        """
        tools = self.tools or []
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        functions = [t.function.model_dump(exclude_none=True) for t in tools]
        max_calls = 1 if self.parallel_tool_calls is False else None
        if choice == "none":
            return None
        if not tools:
            if choice == "auto":
                return None
            raise ApiError(400, "tool_choice: there are no tools to choose from (give tools)", "tool_choice")
        if choice == "auto":
            return ToolCalls("auto", max_calls=max_calls)
        if choice == "required":
            return ToolCalls("required", tool_parsers.required_schema(functions, max_calls is None), max_calls)
        assert isinstance(choice, NamedToolChoice)
        name = choice.function.name
        function = next((f for f in functions if f["name"] == name), None)
        if function is None:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(f['name'] for f in functions)})", "tool_choice")
        return ToolCalls("named", tool_parsers.named_schema(function), name=name)

    def chat_prompt(self) -> ChatPrompt:
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools or ()) or None
        return ChatPrompt(tuple(m.message() for m in self.messages), tools, self.chat_template_kwargs)


@dataclass(frozen=True)
class ToolCalls:
    """How an answer's tool calls are read: `auto` (the server's parser), `required` or `named` (generated
    under `schema`)."""

    mode: Literal["auto", "required", "named"]
    schema: dict[str, Any] | None = None
    max_calls: int | None = None
    name: str | None = None  # named: the function

    def parser(self, auto: ToolParser) -> ToolParser:
        if self.mode == "named":
            assert self.name is not None
            return tool_parsers.NamedCall(self.name)
        return tool_parsers.ArrayCalls() if self.mode == "required" else auto


@dataclass(frozen=True)
class ChatPrompt:
    """What the chat template renders: the messages, the tools, the extra template variables."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """One OpenAI request as the tokenizer's Generate takes it, plus what shapes the answer."""

    request: generation_pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    top_n: int  # -1: no logprobs
    n: int
    model: str | None = None  # the model the client named, if it named one
    prompt: ChatPrompt | None = None  # chat: what the front door renders with the chat template
    tool_calls: ToolCalls | None = None  # chat with tools: how the answer's calls are read
    constraint_param: str | None = None  # the body field the constraint came from


def parse_body(body: Any, chat: bool) -> ParsedRequest:
    """The body of one request (parsed JSON) checked by its endpoint's model; ApiError when it is bad."""
    try:
        parsed = (ChatBody if chat else CompletionBody).model_validate(body)
    except ValidationError as exc:
        raise ApiError.from_validation(exc) from None
    request = parsed.generate_request()
    constraints = parsed.constraints()
    if len(constraints) > 1:
        first, second = constraints[0][0], constraints[1][0]
        raise ApiError(400, f"{second} cannot be combined with {first}: one constraint per request", second)
    source = None
    if constraints:
        source, constraint = constraints[0]
        request.sampling.constraint.CopyFrom(constraint)
        # A schema the scheduler refuses that came from tool_choice is a tool's parameters.
        source = "tools" if source == "tool_choice" else source
    s = request.sampling
    include_usage = parsed.stream_options is not None and bool(parsed.stream_options.include_usage)
    prompt = parsed.chat_prompt() if isinstance(parsed, ChatBody) else None
    calls = parsed.tool_calls() if isinstance(parsed, ChatBody) else None
    return ParsedRequest(request, chat, request.stream, include_usage, s.logprobs if s.HasField("logprobs") else -1,
                         s.n if s.HasField("n") else 1, parsed.model, prompt, calls, source)


# ---- writing answers --------------------------------------------------------------

TokenText = Callable[[int], str]


def _logprobs_json(rows, token_text: TokenText, chat: bool, offset: int) -> dict:
    if chat:
        content = []
        for row in rows:
            text = token_text(row.token_id)
            content.append({
                "token": text, "logprob": row.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": token_text(t.token_id), "logprob": t.logprob,
                                  "bytes": list(token_text(t.token_id).encode())} for t in row.top],
            })
        return {"content": content}
    tokens, offsets = [], []
    for row in rows:
        tokens.append(token_text(row.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [row.logprob for row in rows],
        "top_logprobs": [{token_text(t.token_id): t.logprob for t in row.top} for row in rows],
        "text_offset": offsets,
    }


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChoiceOutput:
    """One chat choice's text as OpenAI's message parts: reasoning_content, content and tool_calls.

    Streamed, each piece gives a delta; whole, the text is pushed once, so both read the same.
    """

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallStream | None) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self.reasoning = ""
        self.content = ""

    def push(self, piece: str, final: bool) -> dict[str, Any]:
        """The delta for the next piece: content, reasoning_content and tool_calls, where there are any."""
        reasoning, content = self._reasoning.push(piece, final) if self._reasoning else ("", piece)
        calls: list[dict[str, Any]] = []
        if self._tools is not None:
            content, calls = self._tools.push(content, final)
        self.reasoning += reasoning
        self.content += content
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        # With tools an empty content is null (OpenAI's, beside calls), so it is left out of the delta.
        if content or not (reasoning or calls or self._tools):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self._tools.calls if self._tools is not None else []

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self._tools else "")}
        if self._reasoning is not None:
            message["reasoning_content"] = self.reasoning or None
        if self.calls:
            message["tool_calls"] = self.calls
        return message

    def finish_reason(self, finish: str | None) -> str | None:
        return "tool_calls" if finish == "stop" and self.calls else finish


def choice_outputs(parsed: ParsedRequest, rendered: str, auto_tools: ToolParser,
                   reasoning: ReasoningParser | None) -> Callable[[], ChoiceOutput] | None:
    """How each choice of a chat answer to the `rendered` prompt is read; None: its text is all content."""
    calls = parsed.tool_calls
    if calls is None and reasoning is None:
        return None

    def output() -> ChoiceOutput:
        tools = ToolCallStream(calls.parser(auto_tools), calls.max_calls) if calls is not None else None
        return ChoiceOutput(reasoning.splitter(rendered) if reasoning is not None else None, tools)

    return output


class Answer:
    """Builds the JSON of one request's answer from its GenerateResponses (streamed or merged).

    `outputs` makes the ChoiceOutput that reads each chat choice's text (reasoning, tool calls).
    """

    def __init__(self, parsed: ParsedRequest, model: str, token_text: TokenText,
                 outputs: Callable[[], ChoiceOutput] | None = None) -> None:
        self.parsed = parsed
        self.model = model
        self.token_text = token_text
        self._new_output = outputs
        self._outputs: dict[int, ChoiceOutput] = {}
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + time.strftime("%Y%m%d%H%M%S") + f"{id(self):x}"
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens: dict[int, int] = {}
        self._text_offsets: dict[int, int] = {}
        self._started: set[int] = set()

    def _count(self, r: generation_pb2.GenerateResponse) -> None:
        if r.HasField("usage"):
            self.prompt_tokens = r.usage.prompt_tokens
            self.cached_tokens = r.usage.cached_prompt_tokens
            self.completion_tokens[r.index] = r.usage.completion_tokens

    @property
    def usage(self) -> dict:
        return _usage(self.prompt_tokens, sum(self.completion_tokens.values()), self.cached_tokens)

    def _logprobs(self, r: generation_pb2.GenerateResponse) -> dict | None:
        if self.parsed.top_n < 0:
            return None
        offset = self._text_offsets.get(r.index, 0)
        self._text_offsets[r.index] = offset + len(r.text)
        return _logprobs_json(r.logprobs, self.token_text, self.parsed.chat, offset)

    def complete(self, responses: list[generation_pb2.GenerateResponse]) -> dict:
        """The non-streamed answer: one merged response per index."""
        choices = []
        for r in sorted(responses, key=lambda r: r.index):
            self._count(r)
            finish = FINISH_REASON_NAMES.get(r.finish_reason)
            logprobs = self._logprobs(r)
            if self.parsed.chat and self._new_output is not None:
                output = self._new_output()
                output.push(r.text, final=True)
                choices.append({"index": r.index, "message": output.message(), "logprobs": logprobs,
                                "finish_reason": output.finish_reason(finish)})
            elif self.parsed.chat:
                choices.append({"index": r.index, "message": {"role": "assistant", "content": r.text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": r.index, "text": r.text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": self.id, "object": "chat.completion" if self.parsed.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage}

    def chunk(self, r: generation_pb2.GenerateResponse) -> dict:
        """One streamed chunk for one GenerateResponse."""
        self._count(r)
        finish = FINISH_REASON_NAMES.get(r.finish_reason)
        logprobs = self._logprobs(r)
        if self.parsed.chat:
            delta: dict = {"content": r.text}
            if self._new_output is not None:
                output = self._outputs.get(r.index) or self._outputs.setdefault(r.index, self._new_output())
                delta = output.push(r.text, final=finish is not None)
                finish = output.finish_reason(finish)
            if r.index not in self._started:  # the first chunk of each choice names the role
                self._started.add(r.index)
                delta = {"role": "assistant", **delta}
            choice = {"index": r.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": r.index, "text": r.text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice])

    def usage_chunk(self) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the whole request's usage."""
        out = self._envelope([])
        out["usage"] = self.usage
        return out

    def _envelope(self, choices: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.parsed.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}


def models_json(info: generation_pb2.ModelInfo, created: int) -> dict:
    return {"object": "list", "data": [{
        "id": info.model_name, "object": "model", "created": created, "owned_by": "llmrpc",
        "max_model_len": info.context_length,
    }]}
