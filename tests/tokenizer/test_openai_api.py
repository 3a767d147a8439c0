"""The OpenAI JSON ⇄ Generate translation, without a server."""
from __future__ import annotations

import grpc
import pytest

from llmrpc.services.status import FieldError, StatusError
from llmrpc.services.tokenizer.openai_api import Answer, ApiError, parse_body
from llmrpc.v1 import generation_pb2

CHAT = {"messages": [{"role": "user", "content": "x"}]}


def test_completion_fields_map_onto_sampling_params() -> None:
    parsed = parse_body({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                         "top_k": 4, "min_p": 0.1, "presence_penalty": 1, "frequency_penalty": -1,
                         "repetition_penalty": 1.2, "seed": -1, "n": 2, "stop": "\n", "logprobs": 3,
                         "ignore_eos": True, "min_tokens": 2, "stop_token_ids": [7], "stream": True,
                         "stream_options": {"include_usage": True}}, chat=False)
    r, s = parsed.request, parsed.request.sampling
    assert r.text == "hi" and r.stream and parsed.include_usage and parsed.n == 2 and parsed.top_n == 3
    assert (s.max_tokens, s.top_k, s.n, s.min_tokens, list(s.stop), list(s.stop_token_ids)) == (5, 4, 2, 2, ["\n"], [7])
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9) and s.min_p == pytest.approx(0.1)
    assert (s.presence_penalty, s.frequency_penalty) == (1.0, -1.0) and s.repetition_penalty == pytest.approx(1.2)
    assert s.seed == 2**64 - 1 and s.ignore_eos and s.logprobs == 3


def test_unset_fields_stay_unset_and_completions_default_to_16_tokens() -> None:
    s = parse_body({"prompt": [1, 2, 3]}, chat=False).request.sampling
    assert s.max_tokens == 16
    for name in ("temperature", "top_p", "top_k", "seed", "logprobs", "n"):
        assert not s.HasField(name), name
    chat = parse_body({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                       "logprobs": True, "max_completion_tokens": 9}, chat=True)
    assert not chat.request.HasField("stream") or not chat.request.stream
    assert chat.request.chat.messages[0].content == "ab" and chat.request.sampling.max_tokens == 9
    assert chat.top_n == 0 and chat.request.sampling.logprobs == 0


@pytest.mark.parametrize("body, chat, param", [
    ({"prompt": "x", "top_k": 1.5}, False, "top_k"),
    ({"prompt": "x", "stop": [""]}, False, "stop"),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({"prompt": "x", "echo": True}, False, "echo"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, True, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, True, "stream"),
    # JSON types are strict: no strings for numbers, no booleans for integers, nothing past int32
    ({"prompt": "x", "temperature": "0.5"}, False, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, False, "temperature"),
    ({"prompt": "x", "n": True}, False, "n"),
    ({"prompt": "x", "max_tokens": 2**31}, False, "max_tokens"),
    ({"prompt": [1, 2**31]}, False, "prompt"),
    ({"prompt": "x", "stop_token_ids": [1, "2"]}, False, "stop_token_ids"),
    ({"prompt": "x", "stream_options": "usage"}, False, "stream_options"),
    ({"prompt": "x", "model": 7}, False, "model"),
    ({"messages": [{"content": "x"}]}, True, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, True,
     "messages"),
])
def test_bad_bodies_name_the_parameter(body, chat, param) -> None:
    with pytest.raises(ApiError) as err:
        parse_body(body, chat)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"
    assert err.value.message.startswith(param)


def test_a_body_that_is_no_object_is_a_400_without_a_parameter() -> None:
    for body in ([{"prompt": "x"}], "x", None):
        with pytest.raises(ApiError) as err:
            parse_body(body, chat=False)
        assert (err.value.status, err.value.param, err.value.message) == (
            400, None, "the request body must be a JSON object")


@pytest.mark.parametrize("body, chat, param", [
    ({"prompt": "x", "logit_bias": {"50256": -100}}, False, "logit_bias"),
    ({"prompt": "x", "suffix": "and so on"}, False, "suffix"),
    ({"prompt": "x", "best_of": 3}, False, "best_of"),
    ({"prompt": "x", "n": 2, "best_of": 3}, False, "best_of"),
    ({**CHAT, "logit_bias": {"7": 5}}, True, "logit_bias"),
    ({**CHAT, "functions": [{"name": "f"}]}, True, "functions"),
    ({**CHAT, "function_call": "auto"}, True, "function_call"),
    ({**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, True, "audio"),
    ({**CHAT, "modalities": ["text", "audio"]}, True, "modalities"),
    ({**CHAT, "web_search_options": {}}, True, "web_search_options"),
    ({**CHAT, "reasoning_effort": "high"}, True, "reasoning_effort"),
    ({**CHAT, "verbosity": "low"}, True, "verbosity"),
])
def test_fields_that_would_change_the_answer_and_are_not_implemented_are_refused(body, chat, param) -> None:
    with pytest.raises(ApiError) as err:
        parse_body(body, chat)
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.message.startswith(param) and "not supported" in err.value.message


@pytest.mark.parametrize("extra, chat", [
    ({"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
      "safety_identifier": "s", "prompt_cache_key": "p"}, True),
    ({"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
      "modalities": ["text"], "functions": None, "function_call": "none"}, True),
    ({"user": "u-1", "echo": False, "suffix": "", "best_of": 1, "logit_bias": {}}, False),
    ({"n": 2, "best_of": 2}, False),
])
def test_informational_and_neutral_fields_are_accepted_and_change_nothing(extra, chat) -> None:
    plain = CHAT if chat else {"prompt": "x"}
    with_extra = parse_body({**plain, **extra}, chat)
    without = parse_body({**plain, **{k: v for k, v in extra.items() if k == "n"}}, chat)
    assert with_extra == without


@pytest.mark.parametrize("field, chat, param", [
    ("sampling.top_p", False, "top_p"),
    ("sampling.stop[1]", False, "stop"),
    ("sampling.logprobs", False, "logprobs"),
    ("sampling.logprobs", True, "top_logprobs"),
    ("tokens.ids[3]", False, "prompt"),
    ("tokens.ids[3]", True, "messages"),
    ("text", False, "prompt"),
    ("sampling.max_tokens", False, "max_tokens"),
    ("chat.messages[0].role", True, "messages"),
])
def test_service_errors_become_400s_naming_the_parameter(field, chat, param) -> None:
    """The parameter comes from the status's BadRequest field violation, not from the message."""
    message = "whatever the service says, for people"
    err = ApiError.from_error(FieldError(field, message).relayed("scheduler at 127.0.0.1:1"), chat)
    assert (err.status, err.param, err.message) == (400, param, message)
    down = ApiError.from_error(StatusError(grpc.StatusCode.UNAVAILABLE, "down").relayed("scheduler at 127.0.0.1:1"),
                               chat)
    assert (down.status, down.param, down.message) == (503, None, "scheduler at 127.0.0.1:1: down")


def test_answers_sum_usage_over_indices_and_lay_out_logprobs() -> None:
    parsed = parse_body({"prompt": "x", "n": 2, "logprobs": 1}, chat=False)
    answer = Answer(parsed, "m", lambda t: f"<{t}>")
    top = [generation_pb2.TopLogprob(token_id=5, logprob=-0.1)]
    rs = [generation_pb2.GenerateResponse(
        index=i, text=f"<5><{6 + i}>", finish_reason=generation_pb2.FINISH_REASON_LENGTH,
        logprobs=[generation_pb2.TokenLogprob(token_id=5, logprob=-0.1, top=top),
                  generation_pb2.TokenLogprob(token_id=6 + i, logprob=-2.0, top=top)],
        usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_prompt_tokens=1)) for i in (1, 0)]
    out = answer.complete(rs)
    assert [c["index"] for c in out["choices"]] == [0, 1] and out["choices"][1]["text"] == "<5><7>"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                            "prompt_tokens_details": {"cached_tokens": 1}}
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<5>", "<6>"] and lp["text_offset"] == [0, 3]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -2.0]) and lp["top_logprobs"][1] == {"<5>": pytest.approx(-0.1)}
    assert out["choices"][0]["finish_reason"] == "length"


def test_http_port_checks_the_api_key_and_reports_health(tokenizer) -> None:
    """A front door whose scheduler is absent: 401 without the key, 503 once past it, /health open."""
    import asyncio

    import aiohttp

    from llmrpc.services.auth import Security
    from llmrpc.services.tokenizer.server import TokenizerConfig, start

    async def run() -> list[tuple[int, object]]:
        config = TokenizerConfig(model_path="unused", port=0, scheduler="127.0.0.1:1", http_port=0,
                                 security=Security(api_key="sesame"))
        front = await start(config, tokenizer=tokenizer)
        base = f"http://127.0.0.1:{front.http_port}"
        body = {"prompt": "hi", "max_tokens": 2}
        seen = []
        try:
            async with aiohttp.ClientSession() as http:
                for path, headers in (("/health", {}), ("/v1/completions", {}),
                                      ("/v1/completions", {"Authorization": "Bearer wrong"}),
                                      ("/v1/completions", {"Authorization": "Bearer sesame"})):
                    method = http.get if path == "/health" else http.post
                    async with method(base + path, json=body, headers=headers) as r:
                        seen.append((r.status, await r.json() if path != "/health" else await r.text()))
        finally:
            await front.stop()
        return seen

    health, no_key, wrong_key, right_key = asyncio.run(run())
    assert health == (503, "not serving\n")
    assert no_key[0] == wrong_key[0] == 401 and no_key[1]["error"]["code"] == "invalid_api_key"
    assert right_key[0] == 503 and right_key[1]["error"]["type"] == "server_error"
