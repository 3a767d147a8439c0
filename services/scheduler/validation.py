"""Turns a token-level GenerateRequest into core Requests, refusing bad input by field name.

Ranges follow vLLM/OpenAI conventions. Limits that depend on the pool or the
context (prompt + max_tokens) are the core's to check (AdmissionError).
"""
from __future__ import annotations

import dataclasses
import math
import re

from llmrpc.services.scheduler.request import Request, Sampling
from llmrpc.v1 import generation_pb2, worker_pb2

DEFAULT_MAX_TOKENS = 128
MAX_N = 16
MAX_LOGPROBS = 20
MAX_REQUEST_ID_LEN = 256
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]+")


class RequestError(ValueError):
    """Bad input; the message starts with the offending field."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def _finite(name: str, value: float) -> float:
    _check(math.isfinite(value), f"sampling.{name} must be a finite number, got {value}")
    return value


def check_request_id(request_id: str) -> None:
    _check(len(request_id) <= MAX_REQUEST_ID_LEN, f"request_id is longer than {MAX_REQUEST_ID_LEN} characters")
    _check(_REQUEST_ID.fullmatch(request_id) is not None,
           "request_id may only hold letters, digits and . _ : / @ + = -")


def parse_sampling(s: generation_pb2.SamplingParams, vocab_size: int) -> tuple[Sampling, dict]:
    """The worker-side sampling facts and the scheduler-side limits of one request."""
    temperature = _finite("temperature", s.temperature) if s.HasField("temperature") else 1.0
    _check(temperature >= 0, f"sampling.temperature must be >= 0, got {temperature}")
    top_p = _finite("top_p", s.top_p) if s.HasField("top_p") else 1.0
    _check(0 < top_p <= 1, f"sampling.top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else -1
    _check(top_k == -1 or top_k >= 1, f"sampling.top_k must be -1 (off) or >= 1, got {top_k}")
    min_p = _finite("min_p", s.min_p) if s.HasField("min_p") else 0.0
    _check(0 <= min_p <= 1, f"sampling.min_p must be in [0, 1], got {min_p}")
    repetition = _finite("repetition_penalty", s.repetition_penalty) if s.HasField("repetition_penalty") else 1.0
    _check(repetition > 0, f"sampling.repetition_penalty must be > 0, got {repetition}")
    presence = _finite("presence_penalty", s.presence_penalty) if s.HasField("presence_penalty") else 0.0
    _check(-2 <= presence <= 2, f"sampling.presence_penalty must be in [-2, 2], got {presence}")
    frequency = _finite("frequency_penalty", s.frequency_penalty) if s.HasField("frequency_penalty") else 0.0
    _check(-2 <= frequency <= 2, f"sampling.frequency_penalty must be in [-2, 2], got {frequency}")
    logprobs = s.logprobs if s.HasField("logprobs") else -1
    _check(s.HasField("logprobs") is False or 0 <= logprobs <= MAX_LOGPROBS,
           f"sampling.logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    _check(max_tokens >= 1, f"sampling.max_tokens must be >= 1, got {max_tokens}")
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    _check(0 <= min_tokens <= max_tokens, f"sampling.min_tokens must be in [0, max_tokens], got {min_tokens}")
    n = s.n if s.HasField("n") else 1
    _check(1 <= n <= MAX_N, f"sampling.n must be in [1, {MAX_N}], got {n}")
    _check(len(s.stop) == 0, "sampling.stop: stop strings need text; send them to the tokenizer service")
    for i, t in enumerate(s.stop_token_ids):
        _check(0 <= t < vocab_size, f"sampling.stop_token_ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
    sampling = Sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
        seed=s.seed if s.HasField("seed") else None, logprobs=logprobs,
    )
    limits = dict(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=s.ignore_eos,
                  stop_token_ids=frozenset(s.stop_token_ids), n=n)
    return sampling, limits


def build_requests(request: generation_pb2.GenerateRequest, request_id: str,
                   info: worker_pb2.WorkerInfo, max_prompt_tokens: int = 0) -> list[Request]:
    """One core Request per completion (n of them; index i gets request id `<id>#i` when n > 1).

    `max_prompt_tokens` > 0 refuses longer prompts (the operator's limit, below the context's).
    """
    check_request_id(request_id)
    kind = request.WhichOneof("input")
    _check(kind is not None, "input: set tokens (the scheduler takes token ids)")
    _check(kind == "tokens", f"input: the scheduler takes tokens only, not {kind}; send {kind} to the tokenizer service")
    prompt = tuple(request.tokens.ids)
    _check(len(prompt) > 0, "tokens.ids is empty")
    _check(max_prompt_tokens <= 0 or len(prompt) <= max_prompt_tokens,
           f"tokens.ids has {len(prompt)} tokens, more than this server's --max-prompt-tokens {max_prompt_tokens}")
    for i, t in enumerate(prompt):
        if not 0 <= t < info.vocab_size:
            raise RequestError(f"tokens.ids[{i}] = {t} is outside the vocabulary [0, {info.vocab_size})")
    sampling, limits = parse_sampling(request.sampling, info.vocab_size)
    n = limits.pop("n")
    requests = []
    for index in range(n):
        per_index = sampling
        if n > 1 and sampling.seed is not None:
            # n samples under one seed would be n copies; each index gets its own stream.
            per_index = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**64)
        rid = request_id if n == 1 else f"{request_id}#{index}"
        requests.append(Request(rid, prompt, per_index, **limits))
    return requests
