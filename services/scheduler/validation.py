"""Turns a token-level GenerateRequest into core Requests, refusing bad input by field name.

The one place a request's sampling is checked: each SamplingParams field that is set must meet
its rule in RULES, and the typed facts are then read by field name (`Sampling` for the worker,
`Limits` for the scheduler), unset fields taking the dataclasses' defaults. Ranges follow
vLLM/OpenAI conventions. Limits that depend on the pool or the context (prompt + max_tokens)
are the core's to check (AdmissionError, turned into a FieldError by `admission_error`).
A constraint is checked as far as it can be without the tokenizer (`parse_constraint`); the
worker compiles it before the request is queued.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

from google.protobuf.descriptor import FieldDescriptor

from llmrpc.services.contract import Limits, check_request_id
from llmrpc.services.messages import from_message
from llmrpc.engine.constraint import Constraint
from llmrpc.engine.step import Sampling
from llmrpc.services.scheduler.request import AdmissionError, Request
from llmrpc.services.status import FieldError
from llmrpc.v1 import generation_pb2, worker_pb2

MAX_N = 16
MAX_LOGPROBS = 20

# What a SamplingParams field must be when it is set: (test, the bound as a message says it).
# Fields without a rule take any value of their type; floats must also be finite.
RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "logprobs": (lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
    "n": (lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
    "min_tokens": (lambda v: v >= 0, "in [0, max_tokens]"),
}

# The core's names for what it refuses (AdmissionError.field) → the request's field paths.
_WIRE_FIELD = {"max_tokens": "sampling.max_tokens", "prompt": "tokens.ids"}


def parse_sampling(s: generation_pb2.SamplingParams, vocab_size: int) -> tuple[Sampling, Limits]:
    """The worker-side sampling facts and the scheduler-side limits of one request; FieldError when bad."""
    for fd, value in s.ListFields():  # only the fields that are set
        name = f"sampling.{fd.name}"
        if fd.type == FieldDescriptor.TYPE_FLOAT and not math.isfinite(value):
            raise FieldError(name, f"{name} must be a finite number, got {value}")
        rule = RULES.get(fd.name)
        if rule is not None and not rule[0](value):
            raise FieldError(name, f"{name} must be {rule[1]}, got {value}")
    if s.stop:
        raise FieldError("sampling.stop", "sampling.stop: stop strings need text; send them to the tokenizer service")
    for i, t in enumerate(s.stop_token_ids):
        if not 0 <= t < vocab_size:
            raise FieldError(f"sampling.stop_token_ids[{i}]", f"sampling.stop_token_ids[{i}] = {t} is outside the "
                                                              f"vocabulary [0, {vocab_size})")
    limits = from_message(Limits, s)
    if limits.min_tokens > limits.max_tokens:
        raise FieldError("sampling.min_tokens",
                         f"sampling.min_tokens must be in [0, max_tokens], got {limits.min_tokens}")
    constraint = parse_constraint(s)
    if constraint is not None:
        # A constrained output ends with EOS once its grammar is complete: nothing may follow it.
        if limits.ignore_eos:
            raise FieldError("sampling.ignore_eos", "sampling.ignore_eos cannot be set with sampling.constraint: "
                                                    "a constrained output ends with EOS when its grammar is complete")
        if limits.min_tokens:
            raise FieldError("sampling.min_tokens", "sampling.min_tokens cannot be set with sampling.constraint: "
                                                    "a constrained output ends when its grammar is complete")
    return from_message(Sampling, s, constraint=constraint), limits


def parse_constraint(s: generation_pb2.SamplingParams) -> Constraint | None:
    """The request's grammar, normalized (a schema's JSON re-serialized, a choice as EBNF); None when unset.

    Only what needs no tokenizer is checked here; the worker compiles the grammar (CompileConstraint)
    before the request is queued and refuses what xgrammar cannot compile, naming the same fields.
    """
    if not s.HasField("constraint"):
        return None
    c = s.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        raise FieldError("sampling.constraint", "sampling.constraint: set one of json_schema, json_object, regex, "
                                                "choice or ebnf (or leave sampling.constraint unset)")
    name = f"sampling.constraint.{kind}"
    if kind == "json_object":
        if not c.json_object:
            raise FieldError(name, f"{name} must be true (leave sampling.constraint unset for free text)")
        return Constraint(kind)
    if kind == "choice":
        values = list(c.choice.values)
        if not values:
            raise FieldError("sampling.constraint.choice.values", "sampling.constraint.choice.values is empty")
        for i, value in enumerate(values):
            if not value:
                field = f"sampling.constraint.choice.values[{i}]"
                raise FieldError(field, f"{field} is empty")
        return Constraint.choice(values)
    text = getattr(c, kind)
    if not text.strip():
        raise FieldError(name, f"{name} is empty")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise FieldError(name, f"{name} is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise FieldError(name, f"{name} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
        # One spelling per schema, so the worker's cache compiles it once (key order kept: it orders the output).
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return Constraint(kind, text)


def build_requests(request: generation_pb2.GenerateRequest, request_id: str,
                   info: worker_pb2.WorkerInfo, max_prompt_tokens: int = 0) -> list[Request]:
    """One core Request per completion (n of them; index i gets request id `<id>#i` when n > 1).

    `max_prompt_tokens` > 0 refuses longer prompts (the operator's limit, below the context's).
    """
    check_request_id(request_id)
    kind = request.WhichOneof("input")
    if kind is None:
        raise FieldError("input", "input: set tokens (the scheduler takes token ids)")
    if kind != "tokens":
        raise FieldError(kind, f"input: the scheduler takes tokens only, not {kind}; "
                               f"send {kind} to the tokenizer service")
    prompt = tuple(request.tokens.ids)
    if not prompt:
        raise FieldError("tokens.ids", "tokens.ids is empty")
    if 0 < max_prompt_tokens < len(prompt):
        raise FieldError("tokens.ids", f"tokens.ids has {len(prompt)} tokens, more than this server's "
                                       f"--max-prompt-tokens {max_prompt_tokens}")
    vocab_size = info.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab_size:  # two C loops; the index is looked for only when one is bad
        i, t = next((i, t) for i, t in enumerate(prompt) if not 0 <= t < vocab_size)
        raise FieldError(f"tokens.ids[{i}]", f"tokens.ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
    sampling, limits = parse_sampling(request.sampling, info.vocab_size)
    requests = []
    for index in range(limits.n):
        per_index = sampling
        if limits.n > 1 and sampling.seed is not None:
            # n samples under one seed would be n copies; each index gets its own stream.
            per_index = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**64)
        rid = request_id if limits.n == 1 else f"{request_id}#{index}"
        requests.append(Request.of(rid, prompt, per_index, limits))
    return requests


def admission_error(exc: AdmissionError) -> FieldError:
    """The core's refusal as the request's field: `max_tokens` is `sampling.max_tokens` on the wire."""
    field = _WIRE_FIELD.get(exc.field, exc.field)
    return FieldError(field, f"{field}: {exc.message}")
