"""The OpenAI-compatible HTTP port of a real `llmrpc serve` stack, through the official `openai` client.

Sampling options are checked against a reference: the same model run by
transformers, its logits penalized and argmaxed here, so a test fails when the
server ignores an option.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import openai
import pydantic
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.slow

PAGE_SIZE = 16  # the CPU engine's default KV page size


@pytest.fixture(scope="module")
def client(default_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_stack.http + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(default_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def ref_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def ref_greedy(model, prompt: list[int], steps: int, repetition: float = 1.0, frequency: float = 0.0,
               presence: float = 0.0) -> list[int]:
    """Greedy decoding with the penalties applied by hand (vLLM's definitions), KV-cached."""
    ids, out, past, feed = list(prompt), [], None, list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            result = model(torch.tensor([feed]), cache=past, use_cache=True)
        past = result.cache
        logits = result.logits[0, -1].float().clone()
        seen = sorted(set(ids))
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
        for tok in set(out):
            logits[tok] -= frequency * out.count(tok) + presence
        nxt = int(logits.argmax())
        ids.append(nxt)
        out.append(nxt)
        feed = [nxt]
    return out


def metrics(stack) -> dict[str, float]:
    text = urllib.request.urlopen(stack.http + "/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def info_labels(values: dict[str, float], name: str) -> dict[str, str]:
    """The labels of an info metric (`name{k="v",...} 1`): there must be exactly one series."""
    series = [key for key in values if key.startswith(name + "{")]
    assert len(series) == 1 and values[series[0]] == 1, series
    return dict(pair.split("=", 1) for pair in series[0][len(name) + 1:-1].replace('"', "").split(","))


def post(stack, path: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(stack.http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse(stack, path: str, body: object) -> list[dict]:
    """The JSON events of one streamed answer, [DONE] checked and dropped."""
    req = urllib.request.Request(stack.http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line.removeprefix(b"data: ").decode() for line in r.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- the answers' JSON against the openai package's own types ----------------------

def test_answers_are_valid_openai_types(default_stack, model_name) -> None:
    """Every answer shape, validated with the openai package's pydantic models (not just parsed)."""
    chat = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 1}
    status, whole = post(default_stack, "/v1/chat/completions", chat)
    assert status == 200
    parsed = ChatCompletion.model_validate(whole)
    assert [c.index for c in parsed.choices] == [0, 1] and parsed.usage.total_tokens > 0
    assert all(c.logprobs.content and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
               for c in parsed.choices)
    chunks = sse(default_stack, "/v1/chat/completions",
                 {**chat, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    completion = {"model": model_name, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                  "logprobs": 2}
    status, whole = post(default_stack, "/v1/completions", completion)
    assert status == 200
    assert Completion.model_validate(whole).choices[0].finish_reason == "length"
    pieces = sse(default_stack, "/v1/completions", {**completion, "stream": True})
    assert len(pieces) == 4
    Completion.model_validate(pieces[-1])
    for piece in pieces[:-1]:
        # Streamed completions are Completions, except that OpenAI itself sends finish_reason null
        # until the end, which the type (shared with the whole answer) marks as required.
        with pytest.raises(pydantic.ValidationError) as error:
            Completion.model_validate(piece)
        assert [(e["loc"], e["input"]) for e in error.value.errors()] == [(("choices", 0, "finish_reason"), None)]
    assert "".join(p["choices"][0]["text"] for p in pieces) == whole["choices"][0]["text"]


# ---- the openai client: chat and completions, streamed and not ---------------------

def test_models_health_and_chat_streamed_equals_non_streamed(client, model_name, default_stack) -> None:
    assert urllib.request.urlopen(default_stack.http + "/health", timeout=5).status == 200
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_equals_non_streamed_with_length_finish(client, model_name) -> None:
    whole = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=7,
                                      temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 7
    pieces = list(client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=7,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


# ---- every sampling option against the reference -------------------------------------

def test_greedy_and_logprobs_equal_the_reference_log_softmax(client, model_name, reference) -> None:
    model, tok = reference
    prompt = tok.encode("The quick brown fox")
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ids = tok.encode(out.choices[0].text, add_special_tokens=False)
    logp = ref_logits(model, prompt + ids).log_softmax(-1)[len(prompt) - 1:-1]
    assert ids == logp.argmax(-1).tolist()  # greedy is the reference argmax
    for i, token_id in enumerate(ids):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i, token_id]), abs=2e-3)
        top = torch.topk(logp[i], 3)
        want = {tok.decode([t]): float(v) for t, v in zip(top.indices.tolist(), top.values)}
        assert lp.top_logprobs[i].keys() == want.keys()
        for text, value in want.items():
            assert lp.top_logprobs[i][text] == pytest.approx(value, abs=2e-3)


def test_chat_logprobs_carry_top_alternatives(client, model_name) -> None:
    out = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for row in content:
        assert len(row.top_logprobs) == 2 and row.top_logprobs[0].token == row.token  # greedy picks the top one
        assert row.top_logprobs[0].logprob == pytest.approx(row.logprob)
        assert row.logprob >= row.top_logprobs[1].logprob


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.6}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 2.0}], ids=lambda p: next(iter(p)))
def test_penalties_match_the_reference(client, model_name, reference, penalty) -> None:
    model, tok = reference
    prompt = tok.encode("one two one two one two one two")
    plain = ref_greedy(model, prompt, 6)
    want = ref_greedy(model, prompt, 6, penalty.get("repetition_penalty", 1.0),
                      penalty.get("frequency_penalty", 0.0), penalty.get("presence_penalty", 0.0))
    assert want != plain  # the penalty matters for this prompt
    native = {k: v for k, v in penalty.items() if k != "repetition_penalty"}  # OpenAI's own fields
    extra = {"ignore_eos": True, **{k: v for k, v in penalty.items() if k == "repetition_penalty"}}
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body=extra, **native)
    assert tok.encode(out.choices[0].text, add_special_tokens=False) == want


@pytest.mark.parametrize("option", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}],
                         ids=lambda o: next(iter(o)))
def test_filters_that_keep_one_token_equal_greedy(client, model_name, option) -> None:
    prompt, kw = "Once upon a time", dict(max_tokens=12, extra_body={"ignore_eos": True})
    greedy = client.completions.create(model=model_name, prompt=prompt, temperature=0, **kw).choices[0].text
    sampled = client.completions.create(model=model_name, prompt=prompt, temperature=1.5, seed=3, **kw)
    assert sampled.choices[0].text != greedy  # without the filter, this seed strays from greedy
    body = {**kw["extra_body"], **option}
    filtered = client.completions.create(model=model_name, prompt=prompt, temperature=1.5, seed=3,
                                         max_tokens=12, extra_body=body)
    assert filtered.choices[0].text == greedy


def test_stop_strings_and_stop_token_ids_cut_exactly(client, model_name, reference) -> None:
    _, tok = reference
    prompt = "The capital of France is"
    full = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    stop = full[3:6]  # inside the text, across token boundaries or not
    cut = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    third = tok.encode(full, add_special_tokens=False)[2]
    by_id = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"stop_token_ids": [third]})
    assert tok.encode(by_id.choices[0].text, add_special_tokens=False)[-1] == third
    assert by_id.choices[0].finish_reason == "stop" and by_id.usage.completion_tokens == 3


def test_seeds_reproduce_whatever_shares_the_batch(default_stack, model_name) -> None:
    async def run() -> tuple[str, str, str]:
        aclient = openai.AsyncOpenAI(base_url=default_stack.http + "/v1", api_key="unused", max_retries=0)
        kw = dict(model=model_name, prompt="Tell me a story:", max_tokens=16, temperature=1.0, seed=1234)
        alone = (await aclient.completions.create(**kw)).choices[0].text
        others = [aclient.completions.create(model=model_name, prompt=p, max_tokens=24, temperature=1.0)
                  for p in ("A", "Write a poem about the sea", "1 2 3")]
        crowded = await asyncio.gather(aclient.completions.create(**kw), *others)
        other_seed = (await aclient.completions.create(**{**kw, "seed": 99})).choices[0].text
        await aclient.close()
        return alone, crowded[0].choices[0].text, other_seed

    alone, crowded, other_seed = asyncio.run(run())
    assert crowded == alone
    assert other_seed != alone


def test_n_completions_prefill_the_prompt_once(client, model_name, default_stack) -> None:
    prompt = f"Request {uuid.uuid4().hex}: " + "tell me about the weather in spring and autumn. " * 6
    before = metrics(default_stack)
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=4, n=4, temperature=1.0, seed=5)
    after = metrics(default_stack)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) > 1  # each index its own draw
    p = out.usage.prompt_tokens
    tail = p - (p - 1) // PAGE_SIZE * PAGE_SIZE  # what each sibling computes past the shared full pages
    prefilled = after["llmrpc_scheduler_prefill_tokens_total"] - before["llmrpc_scheduler_prefill_tokens_total"]
    assert prefilled == p + 3 * tail
    assert out.usage.completion_tokens == 16


# ---- errors, disconnects, metrics --------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "top_p": 5}, "top_p"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": [1, 2, -3]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
])
def test_bad_input_is_a_400_naming_the_parameter(default_stack, body, param) -> None:
    status, answer = post(default_stack, "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


def test_openai_client_sees_bad_request_and_unknown_model(client, model_name) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}],
                                       presence_penalty=7)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"


def test_a_client_disconnect_aborts_the_request(default_stack, model_name) -> None:
    before = metrics(default_stack)
    url = urlparse(default_stack.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": model_name, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.close()  # gone mid-stream
    conn.close()
    key = 'llmrpc_scheduler_requests_finished_total{reason="abort"}'
    deadline = time.monotonic() + 20
    while (now := metrics(default_stack))[key] == before[key] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now[key] == before[key] + 1
    assert now["llmrpc_scheduler_running_requests"] == 0
    assert now['llmrpc_requests_total{outcome="aborted"}'] >= before['llmrpc_requests_total{outcome="aborted"}'] + 1


def test_metrics_expose_front_and_scheduler_numbers(default_stack, client, model_name) -> None:
    client.completions.create(model=model_name, prompt="Hello there, " * 12, max_tokens=3, temperature=0)
    m = metrics(default_stack)
    assert m['llmrpc_requests_total{outcome="finished"}'] >= 1
    assert m["llmrpc_time_to_first_token_seconds_count"] >= 1
    assert m["llmrpc_inter_token_latency_seconds_count"] >= 2
    for name in ("llmrpc_scheduler_waiting_requests", "llmrpc_scheduler_running_requests",
                 "llmrpc_scheduler_kv_usage_ratio", "llmrpc_scheduler_prefix_cache_hit_ratio",
                 "llmrpc_scheduler_retractions_total"):
        assert name in m
    assert 0 < m["llmrpc_scheduler_kv_usage_ratio"] <= 1  # the prefix cache holds that prompt's pages
    # In vLLM's sense (what llm-d's KV scorer reads) those unreferenced cached pages are free.
    assert m["llmrpc_scheduler_running_requests"] == 0 and m["llmrpc_scheduler_kv_cache_usage_perc"] == 0
    info = info_labels(m, "llmrpc_cache_config_info")
    assert info["page_size"] == info["block_size"] == "16"
    assert int(info["num_pages"]) == int(info["num_gpu_blocks"]) > 0
    assert m["llmrpc_scheduler_steps_total"] >= 3


def test_scheduler_port_returns_the_same_logprobs_streamed_and_merged(default_stack) -> None:
    import grpc

    from llmrpc.v1 import generation_pb2, generation_pb2_grpc

    sampling = generation_pb2.SamplingParams(max_tokens=4, temperature=0, logprobs=2)
    with grpc.insecure_channel(default_stack.scheduler) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        streamed = list(stub.Generate(generation_pb2.GenerateRequest(
            tokens=generation_pb2.TokenIds(ids=[1, 504, 3458, 282]), sampling=sampling), timeout=60))
        (merged,) = list(stub.Generate(generation_pb2.GenerateRequest(
            tokens=generation_pb2.TokenIds(ids=[1, 504, 3458, 282]), sampling=sampling, stream=False), timeout=60))
    rows = [row for r in streamed for row in r.logprobs]
    assert [r.token_id for r in rows] == [t for r in streamed for t in r.token_ids] == list(merged.token_ids)
    assert list(merged.logprobs) == rows
    for row in rows:
        assert len(row.top) == 2 and row.top[0].token_id == row.token_id  # greedy takes the most likely
        assert row.top[0].logprob == row.logprob >= row.top[1].logprob
