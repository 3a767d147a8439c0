"""The OpenAI wire format: JSON request bodies → GenerateRequest, GenerateResponse → JSON answers.

Pure translation, no I/O: http_server.py owns the sockets. Request bodies are
checked field by field and a bad one raises `ApiError` naming the parameter, which
becomes OpenAI's error body with HTTP 400. The sampling fields OpenAI lacks are
accepted under vLLM's names (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids), so clients written for vLLM work unchanged.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from llmrpc.v1 import generation_pb2

FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_ABORT: "abort",
    generation_pb2.FINISH_REASON_ERROR: "error",
}
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

# Our field paths (as the services name them in messages) → the OpenAI parameter.
_PARAM_OF_FIELD = {"tokens.ids": "prompt", "text": "prompt", "chat.messages": "messages", "chat": "messages",
                   "input": "prompt", "request_id": "request_id", "prompt": "prompt"}
_HOP = re.compile(r"^scheduler at \S+: ")
_FIELD = re.compile(r"([a-z_]+(?:\.[a-z_]+)?)")


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
    def from_status(cls, code: grpc.StatusCode, message: str, chat: bool) -> ApiError:
        """A service's gRPC status as HTTP; the parameter is read from the message's leading field."""
        status = HTTP_STATUS.get(code, 500)
        if status < 500:  # which hop refused it is noise to an API client
            message = _HOP.sub("", message)
        param = None
        if status == 400:
            m = _FIELD.match(message)
            if m:
                name = m.group(1)
                name = name.removeprefix("sampling.")
                param = _PARAM_OF_FIELD.get(name, name)
                if param == "prompt" and chat:
                    param = "messages"
                if param == "logprobs" and chat:
                    param = "top_logprobs"
        return cls(status, message, param)


# ---- reading a request body -----------------------------------------------------

_MISSING = object()


def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name} must be {bounds}, got {value}", name)
    return value


def _boolean(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def _int_list(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ApiError(400, f"{name} must be a list of integers", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", "stop")
    return stop


def _sampling(body: dict, default_max_tokens: int | None, chat: bool) -> tuple[generation_pb2.SamplingParams, int]:
    """The SamplingParams of one body, and how many top alternatives a token's logprobs carry."""
    s = generation_pb2.SamplingParams()
    max_tokens = _integer(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(s, name, value)
    for name in ("top_k", "min_tokens", "n"):
        value = _integer(body, name)
        if value is not None:
            setattr(s, name, value)
    seed = _integer(body, "seed")
    if seed is not None:
        s.seed = seed % 2**64  # OpenAI allows negative seeds; the engine's are unsigned
    if _boolean(body, "ignore_eos"):
        s.ignore_eos = True
    s.stop.extend(_stop(body))
    s.stop_token_ids.extend(_int_list(body, "stop_token_ids"))
    top_n = -1
    if chat:
        top = _integer(body, "top_logprobs", 0, 20)
        if _boolean(body, "logprobs"):
            top_n = top or 0
        elif top is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    else:
        top = _integer(body, "logprobs", 0, 20)
        if top is not None:
            top_n = top
    if top_n >= 0:
        s.logprobs = top_n
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != (s.n if s.HasField("n") else 1):
        raise ApiError(400, "best_of other than n is not supported", "best_of")
    return s, top_n


@dataclass(frozen=True)
class ParsedRequest:
    """One OpenAI request as the tokenizer's Generate takes it, plus what shapes the answer."""

    request: generation_pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    top_n: int  # -1: no logprobs
    n: int


def parse_body(body: Any, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", _MISSING)
    if model is not _MISSING and not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    request = generation_pb2.GenerateRequest()
    if chat:
        request.chat.CopyFrom(_chat(body))
    else:
        _prompt(body, request)
        if body.get("echo"):
            raise ApiError(400, "echo is not supported", "echo")
        if body.get("suffix"):
            raise ApiError(400, "suffix is not supported", "suffix")
    sampling, top_n = _sampling(body, None if chat else COMPLETIONS_DEFAULT_MAX_TOKENS, chat)
    request.sampling.CopyFrom(sampling)
    stream = bool(_boolean(body, "stream"))
    request.stream = stream
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ParsedRequest(request, chat, stream, include_usage, top_n, sampling.n if sampling.HasField("n") else 1)


def _prompt(body: dict, request: generation_pb2.GenerateRequest) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.tokens.ids.extend(prompt)
    elif prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (batches of prompts are not supported)",
                       "prompt")


def _chat(body: dict) -> generation_pb2.Chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    chat = generation_pb2.Chat()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        chat.messages.add(role=m["role"], content=content)
    return chat


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


class Answer:
    """Builds the JSON of one request's answer from its GenerateResponses (streamed or merged)."""

    def __init__(self, parsed: ParsedRequest, model: str, token_text: TokenText) -> None:
        self.parsed = parsed
        self.model = model
        self.token_text = token_text
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
            finish = FINISH_REASONS.get(r.finish_reason)
            logprobs = self._logprobs(r)
            if self.parsed.chat:
                choices.append({"index": r.index, "message": {"role": "assistant", "content": r.text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": r.index, "text": r.text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": self.id, "object": "chat.completion" if self.parsed.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage}

    def chunk(self, r: generation_pb2.GenerateResponse) -> dict:
        """One streamed chunk for one GenerateResponse."""
        self._count(r)
        finish = FINISH_REASONS.get(r.finish_reason)
        logprobs = self._logprobs(r)
        if self.parsed.chat:
            delta: dict = {"content": r.text}
            if r.index not in self._started:  # the first chunk of each choice names the role
                self._started.add(r.index)
                delta = {"role": "assistant", "content": r.text}
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
