"""Bad input, overload, cancellation and deadlines against a real stack on a tiny random Llama.

Every test ends by proving that no KV page leaked: once all requests are over,
every page is free or held by the prefix cache, none owned by a request.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import time

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.services.conftest import TINY_MAX_PROMPT_TOKENS, TINY_MAX_RECEIVE_BYTES

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_BATCH = 50
FUZZ_BATCHES = 21  # x 50 requests x 2 services = 2,100 fuzz cases


async def call(stub, request: pb.GenerateRequest, timeout: float = 30.0):
    """(status code, responses) of one Generate call."""
    responses = []
    try:
        async for response in stub.Generate(request, timeout=timeout):
            responses.append(response)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), responses, exc.details()
    return grpc.StatusCode.OK, responses, ""


async def wait_no_leak(target: str, timeout: float = 5.0) -> pb.ModelInfo:
    """Waits until the scheduler is idle, then asserts no page is owned by a request."""
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        deadline = time.monotonic() + timeout
        while True:
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            idle = info.requests_running == 0 and info.requests_waiting == 0
            if idle or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert info.kv_pages_total > 0
    assert (info.requests_running, info.requests_waiting) == (0, 0)
    assert info.kv_pages_free + info.kv_pages_cached == info.kv_pages_total, (
        f"{info.kv_pages_total - info.kv_pages_free - info.kv_pages_cached} KV pages leaked")
    return info


# ---- fuzzing the public GenerateRequest --------------------------------------------------

_ids = itertools.count()
wild_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
int32 = st.integers(-2**31, 2**31 - 1)
ROLES = ["system", "user", "assistant", "tool"]
# Valid ranges per field (so that about half the cases are served, not refused).
VALID_FLOATS = {"temperature": (0, 2), "top_p": (0.125, 1), "min_p": (0, 1), "repetition_penalty": (0.5, 2),
                "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}


@st.composite
def sampling_params(draw, wild: bool) -> pb.SamplingParams:
    s = pb.SamplingParams()
    maybe = lambda: draw(st.integers(0, 3)) == 0  # noqa: E731  each field set in 1 of 4 cases
    # The default max_tokens (128) would make the fuzz slow, not more thorough.
    s.max_tokens = draw(st.one_of(st.integers(-2, 4), int32)) if wild and maybe() else draw(st.integers(1, 4))
    for name, (lo, hi) in VALID_FLOATS.items():
        if maybe():
            setattr(s, name, draw(wild_floats if wild and maybe() else st.floats(lo, hi, width=32)))
    if maybe():
        s.top_k = draw(int32 if wild else st.one_of(st.just(-1), st.integers(1, 100)))
    if maybe():
        s.stop.extend(draw(st.lists(st.text(min_size=0 if wild else 1, max_size=5), max_size=3)))
    if maybe():
        s.stop_token_ids.extend(draw(st.lists(st.integers(-5, 50000) if wild else st.integers(0, 49151), max_size=3)))
    if maybe():
        s.ignore_eos = draw(st.booleans())
    if maybe():
        s.seed = draw(st.integers(0, 2**64 - 1))
    if maybe():
        s.logprobs = draw(st.integers(-2, 25) if wild else st.integers(0, 5))
    if maybe():
        s.n = draw(st.integers(-1, 20) if wild else st.integers(1, 3))
    if maybe():
        s.min_tokens = draw(st.integers(-2, 6) if wild else st.integers(0, 1))
    return s


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    wild = draw(st.integers(0, 2)) == 0  # a third of the requests may break any rule
    request = pb.GenerateRequest(sampling=draw(sampling_params(wild)))
    # Unique suffix: concurrent cases must not collide on an id (ALREADY_EXISTS is not under test).
    valid_id = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:/@+=-]{1,40}", fullmatch=True))
    request_id = draw(st.one_of(valid_id, st.text(max_size=300)) if wild else valid_id)
    if request_id:
        request.request_id = f"{request_id}-{next(_ids)}"
    kind = draw(st.sampled_from(["text", "chat", "tokens"] + (["none"] if wild else [])))
    if kind == "text":
        request.text = draw(st.text(min_size=0 if wild else 1, max_size=200))
    elif kind == "chat":
        role = st.one_of(st.sampled_from(ROLES), st.text(max_size=8)) if wild else st.sampled_from(ROLES)
        messages = draw(st.lists(st.tuples(role, st.text(max_size=50)), min_size=0 if wild else 1, max_size=4))
        for role_, content in messages:
            request.chat.messages.add(role=role_, content=content)
        if draw(st.booleans()):
            request.chat.add_generation_prompt = draw(st.booleans())
    elif kind == "tokens":
        ids = st.one_of(st.integers(0, 49151), st.integers(-10, 60000)) if wild else st.integers(0, 49151)
        request.tokens.ids.extend(draw(st.lists(ids, min_size=0 if wild else 1, max_size=40)))
    if draw(st.booleans()):
        request.stream = draw(st.booleans())
    return request


def test_fuzzed_requests_get_documented_codes_and_leak_nothing(tiny_stack) -> None:
    """2,100 random requests, each batch sent at once to the scheduler and the tokenizer."""
    seen: dict[grpc.StatusCode, int] = {}
    loop = asyncio.new_event_loop()

    async def open_channels():  # aio channels belong to the loop they are made on
        return [channel(tiny_stack.scheduler), channel(tiny_stack.tokenizer)]

    channels = loop.run_until_complete(open_channels())
    stubs = [generation_pb2_grpc.GenerationStub(c) for c in channels]

    @settings(max_examples=FUZZ_BATCHES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(generate_requests(), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
    def batch(requests: list[pb.GenerateRequest]) -> None:
        async def run():
            jobs = []
            for request in requests:
                for stub in stubs:
                    copy = pb.GenerateRequest()
                    copy.CopyFrom(request)
                    if copy.request_id:
                        copy.request_id += f"-{next(_ids)}"
                    jobs.append(call(stub, copy))
            return await asyncio.gather(*jobs)

        for code, responses, details in loop.run_until_complete(run()):
            seen[code] = seen.get(code, 0) + 1
            assert code in DOCUMENTED, f"{code.name}: {details}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert details, "INVALID_ARGUMENT must say which field"
            if code == grpc.StatusCode.OK:
                finished = [r for r in responses if r.finish_reason]
                assert finished and all(r.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
                                        for r in finished)

    try:
        batch()
        print("fuzz status codes:", {c.name: n for c, n in seen.items()})
        assert sum(seen.values()) >= 2000
        assert seen.get(grpc.StatusCode.OK, 0) > 500 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 500
        loop.run_until_complete(wait_no_leak(tiny_stack.scheduler))
    finally:
        for c in channels:
            loop.run_until_complete(c.close())
        loop.close()


# ---- limits ------------------------------------------------------------------------------


def _tokens(n: int, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(tokens=pb.TokenIds(ids=[(7 * i) % 49000 + 3 for i in range(n)]),
                              sampling=pb.SamplingParams(**sampling))


def test_limits_name_the_field(tiny_stack) -> None:
    async def run():
        async with channel(tiny_stack.scheduler) as s, channel(tiny_stack.tokenizer) as t:
            sched, tok = generation_pb2_grpc.GenerationStub(s), generation_pb2_grpc.GenerationStub(t)
            cases = [
                (sched, _tokens(TINY_MAX_PROMPT_TOKENS + 1, max_tokens=1), "INVALID_ARGUMENT", "--max-prompt-tokens"),
                (tok, _tokens(TINY_MAX_PROMPT_TOKENS + 1, max_tokens=1), "INVALID_ARGUMENT", "--max-prompt-tokens"),
                (sched, _tokens(TINY_MAX_PROMPT_TOKENS, max_tokens=1025), "INVALID_ARGUMENT", "max_tokens"),
                (tok, pb.GenerateRequest(request_id="a b", text="hi"), "INVALID_ARGUMENT", "request_id"),
                (tok, pb.GenerateRequest(request_id="x" * 257, text="hi"), "INVALID_ARGUMENT", "request_id"),
                (sched, pb.GenerateRequest(request_id="ünï", tokens=pb.TokenIds(ids=[1])), "INVALID_ARGUMENT",
                 "request_id"),
                (tok, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5)), "INVALID_ARGUMENT",
                 "sampling.top_p"),
                (tok, pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="root", content="x")])),
                 "INVALID_ARGUMENT", "chat.messages[0].role"),
                # Over the public port's receive limit: refused by gRPC before any parsing.
                (tok, pb.GenerateRequest(text="a" * (TINY_MAX_RECEIVE_BYTES + 10)), "RESOURCE_EXHAUSTED", ""),
            ]
            return [(await call(stub, request), code, field) for stub, request, code, field in cases]

    for (code, _, details), expected, field in asyncio.run(run()):
        assert code.name == expected and field in details, (code, details, field)
    asyncio.run(wait_no_leak(tiny_stack.scheduler))


def test_deadline_exceeded_frees_the_pages(tiny_stack) -> None:
    async def run():
        async with channel(tiny_stack.tokenizer) as t, channel(tiny_stack.scheduler) as s:
            jobs = [call(generation_pb2_grpc.GenerationStub(t), _tokens(300, max_tokens=1700, ignore_eos=True),
                         timeout=1.0),
                    call(generation_pb2_grpc.GenerationStub(s), _tokens(300, max_tokens=1700, ignore_eos=True),
                         timeout=1.0)]
            start = time.monotonic()
            results = await asyncio.gather(*jobs)
            return results, time.monotonic() - start

    results, took = asyncio.run(run())
    for code, responses, _ in results:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert responses, "it was generating when the deadline hit"
    assert took < 2.0
    asyncio.run(wait_no_leak(tiny_stack.scheduler))


# ---- concurrency -------------------------------------------------------------------------


def test_thousand_concurrent_streams_match_solo_runs(tiny_stack) -> None:
    prompts = [f"word {i} is" for i in range(50)]

    def request(i: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(text=prompts[i % len(prompts)],
                                  sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    async def run():
        async with channel(tiny_stack.tokenizer) as t:
            stub = generation_pb2_grpc.GenerationStub(t)
            solo = [await call(stub, request(i)) for i in range(len(prompts))]
            start = time.monotonic()
            many = await asyncio.gather(*(call(stub, request(i), timeout=120) for i in range(1000)))
            return solo, many, time.monotonic() - start

    solo, many, took = asyncio.run(run())
    print(f"1000 concurrent streams in {took:.2f} s")
    expected = []
    for code, responses, details in solo:
        assert code == grpc.StatusCode.OK, details
        expected.append(([t for r in responses for t in r.token_ids], "".join(r.text for r in responses)))
    for i, (code, responses, details) in enumerate(many):
        assert code == grpc.StatusCode.OK, details
        got = ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))
        assert got == expected[i % len(prompts)]
        assert len(got[0]) == 8 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    asyncio.run(wait_no_leak(tiny_stack.scheduler))


def test_abort_storm_leaks_nothing_and_survivors_are_exact(tiny_stack) -> None:
    rng = random.Random(8)
    max_tokens = 40

    async def run():
        async with channel(tiny_stack.scheduler) as s, channel(tiny_stack.tokenizer) as t:
            stubs = [generation_pb2_grpc.GenerationStub(s), generation_pb2_grpc.GenerationStub(t)]
            tasks = []
            for i in range(100):
                request = _tokens(rng.randint(5, 200), max_tokens=max_tokens, ignore_eos=True,
                                  temperature=rng.choice([0.0, 0.8]), seed=i)
                tasks.append(asyncio.create_task(call(stubs[i % 2], request, timeout=120)))
            doomed = rng.sample(range(100), 50)
            for i in doomed:
                await asyncio.sleep(rng.uniform(0, 0.02))
                tasks[i].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return doomed, results

    doomed, results = asyncio.run(run())
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled > 0
    for i, result in enumerate(results):
        if isinstance(result, asyncio.CancelledError):
            assert i in doomed
            continue
        code, responses, details = result
        assert code == grpc.StatusCode.OK, details
        assert sum(len(r.token_ids) for r in responses) == max_tokens
        assert responses[-1].usage.completion_tokens == max_tokens
    print(f"abort storm: {cancelled} cancelled mid-stream, {100 - cancelled} finished exactly")
    asyncio.run(wait_no_leak(tiny_stack.scheduler))


# ---- the load harness (bench/load.py) against the same stack --------------------------


def test_load_harness_closed_and_open_loop(tiny_stack, tmp_path) -> None:
    from llmrpc.bench import load

    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"chat_id": i, "timestamp": 100 + i * 0.05, "input_length": 20 + i,
                                           "output_length": 4 + i % 3, "type": "text"}) for i in range(6)) + "\n")
    # Bailian rows sharing 4 of their 5 hash ids (16-token blocks): 64 of 80 prompt tokens in common.
    shared = tmp_path / "shared.jsonl"
    shared.write_text("".join(json.dumps({"timestamp": i * 0.1, "input_length": 80, "output_length": 4,
                                          "hash_ids": [7, 8, 9, 10, 100 + i]}) + "\n" for i in range(6)))
    runs = {
        "closed": ["--target", tiny_stack.tokenizer, "--concurrency", "1,4", "--num-requests", "8",
                   "--input-len", "16:32", "--output-len", "8"],
        "poisson-http": ["--target", tiny_stack.http, "--api", "http", "--rate", "50", "--num-requests", "6",
                         "--input-len", "16", "--output-len", "5"],
        "shared-http": ["--target", tiny_stack.http, "--api", "http", "--trace", str(shared), "--warmup", "2",
                        "--goodput", "ttft:60000", "tpot:60000", "--max-concurrency", "2", "--export-requests"],
        "duration": ["--target", tiny_stack.scheduler, "--rate", "20", "--max-concurrency", "3", "--duration", "1",
                     "--input-len", "16", "--output-len", "4"],
        "shared": ["--target", tiny_stack.scheduler, "--trace", str(shared), "--time-scale", "1,0.5"],
        "trace": ["--target", tiny_stack.scheduler, "--trace", str(trace), "--time-scale", "1,0.5"],
    }
    reports = {}
    for name, argv in runs.items():
        report = reports[name] = load.main([*argv, "--out", str(tmp_path / name)])
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert saved["levels"] == report["levels"] and saved["commit"] and saved["hardware"]["cpus"]
        for level in report["levels"]:
            assert level["failed"] == 0 and level["errors"] == [] and level["completed"] == level["num_prompts"]
            assert level["total_output_tokens"] == level["expected_output_tokens"]
            for name in ("ttft", "tpot", "itl", "e2el"):
                assert 0 <= level[f"median_{name}_ms"] <= level[f"p90_{name}_ms"] <= level[f"p99_{name}_ms"]
    assert [lv["num_prompts"] for lv in report["levels"]] == [6, 6]
    assert report["levels"][0]["expected_output_tokens"] == sum(4 + i % 3 for i in range(6))
    # Prefix reuse is real: each level's 5 later rows find the 4 shared blocks cached (levels draw fresh blocks).
    assert [len(reports[name]["levels"]) for name in ("shared", "shared-http")] == [2, 1]
    for name in ("shared", "shared-http"):
        assert all(lv["total_cached_tokens"] >= 5 * 64 for lv in reports[name]["levels"]), reports[name]["levels"]
    assert reports["shared-http"]["levels"][0]["request_goodput"] == reports["shared-http"]["levels"][0]["request_throughput"]
    assert reports["shared-http"]["levels"][0]["max_concurrent_requests"] <= 2
    rows = [json.loads(line) for line in (tmp_path / "shared-http.requests.jsonl").read_text().splitlines()]
    assert [(r["num_hash_ids"], r["output_tokens"], r["good"]) for r in rows] == [(5, 4, True)] * 6
    assert all(len(r["itl_ms"]) == 3 for r in rows)  # one gap per token after the first, however events split
    duration = reports["duration"]["levels"][0]
    assert 1.0 <= duration["duration"] and duration["num_prompts"] >= 3 and duration["max_concurrent_requests"] <= 3
