"""The scheduler behind the SMG gateway (PyPI `smg`), over SMG's SGLang scheduler contract.

Real processes on free loopback ports: two llmrpc replicas (a worker and a scheduler each, on
the tiny model), llmrpc's own front door (a tokenizer with HTTP) over replica A for reference,
and `smg launch --policy cache_aware` over both schedulers. The first tests call the contract
directly on a scheduler (what it refuses, health, info, loads, abort); the rest go through the
gateway: OpenAI answers token-identical to llmrpc's front, cache-aware routing to the replica
holding a long preamble, a client disconnect freeing its pages, a replica's SIGKILL under load,
and a worker's death showing on its scheduler's health. Every process is stopped at the end,
whatever happened.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto.generated import common_pb2

from llmrpc.services.launcher import SMG_INSTALL, ServiceProcess, find_smg, gateway, routable, wait_model, wait_routable
from llmrpc.services.rpc import channel, free_port
from llmrpc.services.scheduler.smg import SERVICE_NAME
from llmrpc.services.status import bad_fields
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.services.conftest import service, wait_status

SLOTS = 32


@dataclass
class Replica:
    """One llmrpc model replica: a worker and the scheduler in front of it, each its own process."""

    worker: ServiceProcess
    scheduler: ServiceProcess

    def start(self) -> None:
        self.worker.start()
        self.scheduler.start()
        wait_status(self.scheduler, "SERVING")

    def kill(self) -> None:
        """SIGKILL to both processes, as when the replica's machine dies."""
        self.scheduler.kill()
        self.worker.kill()


@dataclass
class Fleet:
    replicas: list[Replica]
    front: ServiceProcess  # llmrpc's own front door, over replica A
    gateway: ServiceProcess
    model: str  # the model id SMG serves


def _replica(tmp: Path, model: Path) -> Replica:
    worker = service(tmp, "worker", "--model", model, "--device", "cpu", "--max-running-requests", SLOTS,
                     "--max-total-tokens", 16384)
    return Replica(worker, service(tmp, "scheduler", "--workers", worker.target, "--check-kv-invariants"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    assert find_smg(), f"the smg gateway is missing: {SMG_INSTALL} (or pip install -e '.[test]')"
    tmp = tmp_path_factory.mktemp("smg")
    replicas = [_replica(tmp, tiny_model) for _ in range(2)]
    http_port = free_port()
    front = service(tmp, "tokenizer", "--model", tiny_model, "--scheduler", replicas[0].scheduler.target,
                    "--http-port", http_port)
    front.http = f"http://127.0.0.1:{http_port}"
    smg = gateway(tmp, tiny_model, [r.scheduler.target for r in replicas], "cache_aware")
    processes = [p for r in replicas for p in (r.worker, r.scheduler)] + [front]
    try:
        for p in processes:
            p.start()
        for p in processes:
            wait_status(p, "SERVING")
        smg.start()
        wait_routable(smg, [r.scheduler.target for r in replicas])
        yield Fleet(replicas, front, smg, wait_model(smg))
    finally:
        for p in [smg, *reversed(processes)]:
            p.stop()  # each in its own process group: SIGTERM, then SIGKILL to what is left of it


# ---- the contract, called directly ---------------------------------------------------------


def _request(**fields) -> sg.GenerateRequest:
    """A valid greedy request of 3 prompt tokens, then `fields` set on it (`s_NAME` is sampling_params.NAME)."""
    request = sg.GenerateRequest(
        request_id=f"direct-{random.randrange(10**9)}", tokenized=sg.TokenizedInput(input_ids=[5, 6, 7]),
        sampling_params=sg.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                          max_new_tokens=4, n=1),
        logprob_start_len=-1)
    for name, value in fields.items():
        target, attr = (request.sampling_params, name[2:]) if name.startswith("s_") else (request, name)
        field = target.DESCRIPTOR.fields_by_name[attr]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(target, attr).update(value)
        elif field.message_type is not None:
            getattr(target, attr).CopyFrom(value)
        elif field.is_repeated:
            getattr(target, attr).extend(value)
        else:
            setattr(target, attr, value)
    return request


async def _answer(stub: sg_grpc.SglangSchedulerStub, request: sg.GenerateRequest) -> list[sg.GenerateResponse]:
    return [r async for r in stub.Generate(request, timeout=30)]


REFUSED = [
    (dict(s_regex="[a-"), "sampling_params.regex"),  # a grammar xgrammar cannot compile
    (dict(s_json_schema="{not json"), "sampling_params.json_schema"),
    (dict(s_structural_tag="{}"), "sampling_params.structural_tag"),
    (dict(s_stop=["two words"]), "sampling_params.stop"),
    (dict(s_logit_bias={"5": 1.0}), "sampling_params.logit_bias"),
    (dict(s_stream_interval=4), "sampling_params.stream_interval"),
    (dict(mm_inputs=sg.MultimodalInputs(image_urls=["http://x/y.png"])), "mm_inputs"),
    (dict(return_logprob=True, logprob_start_len=0), "logprob_start_len"),
    (dict(lora_id="adapter"), "lora_id"),
    (dict(return_hidden_states=True), "return_hidden_states"),
    (dict(data_parallel_rank=1), "data_parallel_rank"),
    (dict(input_embeds=[0.5]), "input_embeds"),
    # The shared validator's and the core's refusals, in this contract's names:
    (dict(s_top_p=0.0), "sampling_params.top_p"),
    (dict(s_top_k=0), "sampling_params.top_k"),
    (dict(s_min_new_tokens=9), "sampling_params.min_new_tokens"),
    (dict(return_logprob=True, top_logprobs_num=25), "top_logprobs_num"),
    (dict(s_max_new_tokens=5000), "sampling_params.max_new_tokens"),
    (dict(s_stop_token_ids=[60000]), "sampling_params.stop_token_ids[0]"),
    (dict(tokenized=sg.TokenizedInput(input_ids=[5, 60000])), "tokenized.input_ids[1]"),
    (dict(tokenized=sg.TokenizedInput(input_ids=[5, 2**31])), "tokenized.input_ids[1]"),
    (dict(tokenized=sg.TokenizedInput()), "tokenized.input_ids"),
    (dict(request_id="a b"), "request_id"),
]


def test_contract_refuses_what_llmrpc_cannot_honour_by_field(fleet: Fleet) -> None:
    async def run():
        async with channel(fleet.replicas[0].scheduler.target) as ch:
            stub = sg_grpc.SglangSchedulerStub(ch)
            results = []
            for fields, _ in REFUSED:
                try:
                    await _answer(stub, _request(**fields))
                    results.append(("OK", [], ""))
                except grpc.aio.AioRpcError as exc:
                    results.append((exc.code().name, bad_fields(exc), exc.details()))
            missing = sg.GenerateRequest(request_id="no-input", sampling_params=_request().sampling_params)
            try:
                await _answer(stub, missing)
            except grpc.aio.AioRpcError as exc:
                results.append((exc.code().name, bad_fields(exc), exc.details()))
            return results

    results = asyncio.run(run())
    expected = [field for _, field in REFUSED] + ["tokenized"]
    assert [(code, fields) for code, fields, _ in results] == [("INVALID_ARGUMENT", [f]) for f in expected]
    for (_, _, message), field in zip(results, expected):
        assert message.startswith(field), message
        assert "sampling." not in message and "tokens.ids" not in message, message  # llmrpc's own names
    assert "exceeds the context length" in results[expected.index("sampling_params.max_new_tokens")][2]


def test_contract_generate_matches_generation(fleet: Fleet) -> None:
    """Same tokens as llmrpc's Generation on the same scheduler; chunks, then one complete per completion."""
    prompt = [17, 300, 4000, 12, 99, 7]

    async def run():
        async with channel(fleet.replicas[0].scheduler.target) as ch:
            stub, own = sg_grpc.SglangSchedulerStub(ch), generation_pb2_grpc.GenerationStub(ch)
            reference = [t for r in [r async for r in own.Generate(pb.GenerateRequest(
                tokens=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=12, temperature=0.0)))]
                for t in r.token_ids]
            base = dict(tokenized=sg.TokenizedInput(input_ids=prompt), s_max_new_tokens=12)
            streamed = await _answer(stub, _request(**base, stream=True, return_logprob=True, top_logprobs_num=2))
            whole = await _answer(stub, _request(**base))
            two = await _answer(stub, _request(**base, s_n=2, s_temperature=0.8))
            return reference, streamed, whole, two

    reference, streamed, whole, two = asyncio.run(run())
    chunks = [r.chunk for r in streamed if r.HasField("chunk")]
    assert [t for c in chunks for t in c.token_ids] == reference
    assert [c.completion_tokens for c in chunks] == list(itertools.accumulate(len(c.token_ids) for c in chunks))
    assert {c.prompt_tokens for c in chunks} == {len(prompt)}
    assert [t for c in chunks for t in c.output_logprobs.token_ids] == reference
    assert [len(top.token_ids) for c in chunks for top in c.output_logprobs.top_logprobs] == [2] * len(reference)
    (last,) = [r.complete for r in streamed if r.HasField("complete")]
    assert streamed[-1].HasField("complete") and list(last.output_ids) == []  # SMG accumulates the chunks
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", len(prompt), 12)
    assert [r.WhichOneof("response") for r in whole] == ["complete"]
    assert list(whole[0].complete.output_ids) == reference
    assert sorted(r.complete.index for r in two) == [0, 1]
    assert [len(r.complete.output_ids) for r in two] == [12, 12]


async def _load(target: str) -> pb.ModelInfo:
    async with channel(target) as ch:
        return await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)


async def _until(read, ok, timeout: float = 5.0):
    """`read()` again until `ok` holds of it or the timeout passes; the last reading.

    SMG's health probe (a one-token generation every second) can sit in a reading for a
    step, so counts of running requests are read until they settle.
    """
    deadline = time.monotonic() + timeout
    while not ok(value := await read()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


async def _idle(target: str) -> pb.ModelInfo:
    """The scheduler's load once nothing runs or waits: then no page may be left owned."""
    return await _until(lambda: _load(target), lambda i: i.requests_running == i.requests_waiting == 0)


async def _running(targets: list[str], total: int) -> list[int]:
    """How many requests run on each scheduler, read until they add up to the `total` the test started."""
    async def read():
        return [(await _load(t)).requests_running for t in targets]
    return await _until(read, lambda counts: sum(counts) == total)


def _owned(info: pb.ModelInfo) -> int:
    return info.kv_pages_total - info.kv_pages_free - info.kv_pages_cached


def test_contract_abort_ends_the_stream_and_frees_its_pages(fleet: Fleet) -> None:
    target = fleet.replicas[0].scheduler.target

    async def run():
        async with channel(target) as ch:
            stub = sg_grpc.SglangSchedulerStub(ch)
            request = _request(s_max_new_tokens=1500, s_ignore_eos=True, stream=True)
            call = stub.Generate(request, timeout=60)
            first = await call.read()
            busy = await _load(target)
            aborted = await stub.Abort(sg.AbortRequest(request_id=request.request_id, reason="test"), timeout=5)
            rest = []
            while (response := await call.read()) is not grpc.aio.EOF:
                rest.append(response)
            again = await stub.Abort(sg.AbortRequest(request_id=request.request_id), timeout=5)
            return first, busy, aborted, rest, again, await _idle(target)

    first, busy, aborted, rest, again, idle = asyncio.run(run())
    assert first.HasField("chunk") and busy.requests_running >= 1 and _owned(busy) > 0
    assert aborted.success and not again.success
    assert rest[-1].complete.finish_reason == "abort" and rest[-1].complete.completion_tokens < 1500
    assert (idle.requests_running, idle.requests_waiting, _owned(idle)) == (0, 0, 0)


def test_contract_health_info_and_loads(fleet: Fleet) -> None:
    target = fleet.replicas[0].scheduler.target

    async def run():
        async with channel(target) as ch:
            stub = sg_grpc.SglangSchedulerStub(ch)
            health = await stub.HealthCheck(sg.HealthCheckRequest(), timeout=10)
            model = await stub.GetModelInfo(sg.GetModelInfoRequest(), timeout=5)
            server = await stub.GetServerInfo(sg.GetServerInfoRequest(), timeout=5)
            loads = await _until(
                lambda: stub.GetLoads(sg.GetLoadsRequest(include=["core", "memory", "queues", "disagg"]), timeout=5),
                lambda answer: answer.loads[0].num_total_reqs == 0)
            try:
                await stub.GetLoads(sg.GetLoadsRequest(include=["core", "gpu"]), timeout=5)
                bad = []
            except grpc.aio.AioRpcError as exc:
                bad = [exc.code().name, *bad_fields(exc)]
            cached = (await _load(target)).kv_pages_cached  # what earlier tests left in the prefix cache
            flushed = await stub.FlushCache(common_pb2.FlushCacheRequest(timeout_s=5), timeout=10)
            own = await generation_pb2_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            serving = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            listed = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = [s.name async for answer in listed for s in answer.list_services_response.service]
            return health, model, server, loads, bad, cached, flushed, own, serving, services

    health, model, server, loads, bad, cached, flushed, own, serving, services = asyncio.run(run())
    assert health.healthy, health.message
    assert (model.served_model_name, model.max_context_length, model.vocab_size, list(model.eos_token_ids),
            list(model.architectures), model.is_generation) == (
        own.model_name, own.context_length, own.vocab_size, list(own.eos_token_ids), [own.architecture], True)
    assert model.max_req_input_len == own.context_length - 1
    args = dict(server.server_args.items())
    assert (args["page_size"], args["dp_size"], args["tp_size"], args["max_running_requests"]) == (16, 1, 1, SLOTS)
    assert server.max_total_num_tokens == own.total_kv_tokens == 16384
    (load,) = loads.loads
    assert (load.max_total_num_tokens, load.max_running_requests, load.memory.token_capacity) == (16384, SLOTS, 16384)
    assert load.num_running_reqs == load.num_waiting_reqs == load.num_used_tokens == 0
    assert cached > 0 and load.token_usage == 0.0  # cached pages that no request holds count as free
    assert load.disaggregation.mode == "null" and loads.dp_rank_count == 1
    assert bad == ["INVALID_ARGUMENT", "include[1]"]
    assert flushed.success and own.kv_pages_cached == 0
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME in services and "llmrpc.v1.Generation" in services
    with grpc.insecure_channel(target) as ch:  # what grpcurl does: the whole contract from reflection alone
        described = DescriptorPool(ProtoReflectionDescriptorDatabase(ch)).FindServiceByName(SERVICE_NAME)
        assert {"Generate", "Abort", "HealthCheck", "GetModelInfo", "GetServerInfo", "GetLoads"} <= {
            m.name for m in described.methods}


# ---- through the gateway --------------------------------------------------------------------


@dataclass
class Answer:
    """One OpenAI answer, streamed or not, as comparable facts."""

    status: int
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    tokens: list | None = None  # chat logprobs: each token with its bytes
    errors: list | None = None
    events: int = 0  # SSE events carrying text


async def _openai(http: aiohttp.ClientSession, base: str, body: dict, on_event=None) -> Answer:
    chat = "messages" in body
    async with http.post(f"{base}/v1/{'chat/completions' if chat else 'completions'}", json=body) as response:
        if not body.get("stream"):
            data = await response.json()
            if response.status != 200:
                return Answer(response.status, errors=[data])
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            logprobs = (choice.get("logprobs") or {}).get("content") if chat else None
            return Answer(200, text or "", choice["finish_reason"], data["usage"],
                          [(t["token"], t["bytes"]) for t in logprobs] if logprobs else None)
        answer = Answer(response.status, tokens=[] if chat and body.get("logprobs") else None, errors=[])
        async for line in response.content:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                answer.errors.append(data["error"])
                continue
            if data.get("usage"):
                answer.usage = data["usage"]
            for choice in data["choices"]:
                piece = choice["delta"].get("content") if chat else choice["text"]
                if piece:
                    answer.text += piece
                    answer.events += 1
                    if on_event is not None:
                        on_event()
                answer.finish_reason = choice["finish_reason"] or answer.finish_reason
                if answer.tokens is not None and choice.get("logprobs"):
                    answer.tokens += [(t["token"], t["bytes"]) for t in choice["logprobs"]["content"]]
        return answer


def _facts(answer: Answer) -> tuple:
    """What must match between two fronts (cached tokens depend on which replica served)."""
    usage = answer.usage or {}
    return (answer.status, answer.text, answer.finish_reason, usage.get("prompt_tokens"),
            usage.get("completion_tokens"), answer.tokens)


def test_openai_through_smg_is_token_identical_to_llmrpcs_front(fleet: Fleet) -> None:
    """Greedy chat and completions, streamed and not: the same tokens (and logprobs' token bytes) either way."""
    prompt = "The capital of France is"

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            # A word the greedy answer says after a few tokens, as a stop string: one token, which SMG
            # sends to the scheduler as a stop token id (llmrpc's front matches it in text).
            async with http.post(f"{fleet.front.http}/v1/completions", json=dict(
                    model=fleet.model, prompt=prompt, max_tokens=12, temperature=0, logprobs=0)) as answer:
                said = (await answer.json())["choices"][0]["logprobs"]["tokens"]
            stop = next(t for t in said[2:] if t.strip().isalpha() and t.isascii())
            bodies = []
            for stream in (False, True):
                extra = dict(stream=True, stream_options={"include_usage": True}) if stream else {}
                for text in (prompt, "Write a poem about the sea."):
                    bodies.append(dict(messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": text}],
                                       max_tokens=16, temperature=0, logprobs=True, top_logprobs=2, **extra))
                    bodies.append(dict(prompt=text, max_tokens=16, temperature=0, **extra))
                bodies.append(dict(prompt=prompt, max_tokens=12, temperature=0, stop=[stop], **extra))
            return bodies, [(await _openai(http, fleet.gateway.http, dict(model=fleet.model, **b)),
                             await _openai(http, fleet.front.http, dict(model=fleet.model, **b))) for b in bodies]

    bodies, answers = asyncio.run(run())
    for body, (via_smg, via_front) in zip(bodies, answers):
        assert via_smg.status == 200 and via_smg.text, (body, via_smg)
        assert _facts(via_smg) == _facts(via_front), body
    stopped = [via_smg for body, (via_smg, _) in zip(bodies, answers) if "stop" in body]
    assert [(a.finish_reason, a.usage["completion_tokens"] < 12) for a in stopped] == [("stop", True)] * 2


def _preamble(seed: int, words: int = 260) -> str:
    rng = random.Random(seed)
    vocabulary = ["river", "stone", "lantern", "orbit", "meadow", "copper", "violet", "harbor", "signal", "ember"]
    return " ".join(f"{rng.choice(vocabulary)}{rng.randrange(1000)}" for _ in range(words))


def test_requests_after_a_shared_preamble_go_to_the_replica_that_caches_it(fleet: Fleet) -> None:
    preamble = _preamble(time.time_ns())  # new to both replicas

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            ask = lambda q: _openai(http, fleet.gateway.http, dict(model=fleet.model, prompt=f"{preamble}\nQ: {q}?",
                                                                   max_tokens=4, temperature=0))
            first = await ask("what comes first")
            later = [await ask(f"question number {i}") for i in range(6)]
            together = await asyncio.gather(*(ask(f"a concurrent question {i}") for i in range(4)))
            return first, later + list(together)

    first, later = asyncio.run(run())
    assert first.status == 200 and first.usage["prompt_tokens"] > 1000
    for answer in later:
        usage = answer.usage
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.8 * usage["prompt_tokens"], usage


def test_client_disconnect_through_smg_frees_the_pages(fleet: Fleet) -> None:
    targets = [r.scheduler.target for r in fleet.replicas]

    async def run():
        async with aiohttp.ClientSession() as http:
            body = dict(model=fleet.model, prompt=_preamble(1, 60), max_tokens=1500, ignore_eos=True, stream=True)
            response = await http.post(f"{fleet.gateway.http}/v1/completions", json=body)
            for _ in range(5):  # a few events: the request is running on a replica
                await response.content.readline()
            running = await _running(targets, 1)
            owned = max([_owned(await _load(t)) for t in targets])
            response.close()  # the client goes away mid-stream
            t0 = time.monotonic()
            idle = [await _idle(t) for t in targets]
            return running, owned, idle, time.monotonic() - t0

    running, owned, idle, freed_in = asyncio.run(run())
    assert sorted(running) == [0, 1] and owned > 0
    assert [(i.requests_running, i.requests_waiting, _owned(i)) for i in idle] == [(0, 0, 0)] * 2
    assert freed_in < 3.0


def _distinct_prompts(n: int, seed: int) -> list[str]:
    """Short prompts that share no prefix with one another or anything sent before."""
    rng = random.Random(seed)
    starts = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet",
              "Kilo", "Lima"]
    return [f"{starts[i % len(starts)]} {rng.randrange(10**6)} says" for i in range(n)]


async def _prefix_on_each_replica(http: aiohttp.ClientSession, fleet: Fleet) -> list[str]:
    """A long prefix held by each replica, in replica order: new ones are sent until both hold one.

    Cache-aware routing sends a prefix nobody holds to one replica and what follows it there, so
    requests after these prefixes land on a replica the test knows (misses alone need not spread:
    SMG gives them to the replica whose tree of routed prompts is smallest, and the module's earlier
    tests may have grown one tree far past the other: a clean-clone CI run once sent 12 in a row to
    one replica, so up to 40 are sent).
    """
    targets = [r.scheduler.target for r in fleet.replicas]
    owners: dict[int, str] = {}
    attempts = 40
    for _ in range(attempts):
        prefix = _preamble(time.time_ns(), 120)
        before = [(await _load(t)).kv_pages_cached for t in targets]
        await _openai(http, fleet.gateway.http, dict(model=fleet.model, prompt=prefix, max_tokens=1))
        grown = [(await _load(t)).kv_pages_cached - b for t, b in zip(targets, before)]
        owners.setdefault(grown.index(max(grown)), prefix)
        if len(owners) == len(targets):
            return [owners[i] for i in range(len(targets))]
    raise AssertionError(f"{attempts} new prefixes all went to replica {list(owners)}")


async def _running_streams(http: aiohttp.ClientSession, fleet: Fleet, max_tokens: int,
                           prompts: list[str]) -> list[asyncio.Task]:
    """A long greedy stream through the gateway per prompt, returned once every one has received text."""
    started = [asyncio.Event() for _ in prompts]
    bodies = [dict(model=fleet.model, prompt=p, max_tokens=max_tokens, ignore_eos=True, temperature=0, stream=True)
              for p in prompts]
    streams = [asyncio.create_task(_openai(http, fleet.gateway.http, b, e.set)) for b, e in zip(bodies, started)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    return streams


def test_a_replica_killed_under_load(fleet: Fleet, record_property) -> None:
    """Its streams fail at once and cleanly, the other replica answers new requests, and it rejoins."""
    targets = [r.scheduler.target for r in fleet.replicas]

    async def under_load():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            prefixes = await _prefix_on_each_replica(http, fleet)
            prompts = [f"{prefixes[i % 2]} and story {i}" for i in range(8)]  # 4 to each replica
            streams = await _running_streams(http, fleet, 400, prompts)
            running = await _running(targets, 8)
            victim = running.index(max(running))
            t0 = time.monotonic()
            fleet.replicas[victim].kill()
            ended = [(await s, time.monotonic() - t0) for s in asyncio.as_completed(streams)]
            fresh = await asyncio.gather(*(
                _openai(http, fleet.gateway.http, dict(model=fleet.model, prompt=p, max_tokens=8, temperature=0))
                for p in _distinct_prompts(6, 2)))
            return running, victim, ended, fresh, prefixes[victim]

    running, victim, ended, fresh, its_prefix = asyncio.run(under_load())
    assert running == [4, 4]
    failed = [(a, s) for a, s in ended if a.errors]
    finished = [(a, s) for a, s in ended if not a.errors]
    assert len(failed) == running[victim]  # exactly the streams that were on the dead replica
    assert all(a.finish_reason is None and a.events < 400 for a, _ in failed)
    assert all(a.finish_reason == "length" for a, _ in finished)
    assert max(s for _, s in failed) < 2.0  # at once, not at a timeout
    assert [a.status for a in fresh] == [200] * 6 and all(a.usage["completion_tokens"] == 8 for a in fresh)
    deadline = time.monotonic() + 10  # SMG's probes (every second, 3 failures) take the dead replica out
    while routable(fleet.gateway)[f"grpc://{targets[victim]}"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert routable(fleet.gateway)[f"grpc://{targets[victim]}"] is False

    t1 = time.monotonic()
    fleet.replicas[victim].start()
    wait_routable(fleet.gateway, targets)
    rejoined_in = time.monotonic() - t1

    async def again():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            # Its prefix: in SMG's view still the returned replica's, or nobody's (then the smallest tree's).
            streams = await _running_streams(http, fleet, 200, [f"{its_prefix} then {i}" for i in range(8)])
            on_victim = (await _running(targets, 8))[victim]
            return on_victim, await asyncio.gather(*streams)

    on_victim, answers = asyncio.run(again())
    assert on_victim >= 1  # traffic again
    assert [(a.errors, a.finish_reason) for a in answers] == [([], "length")] * 8
    print(f"replica SIGKILL: {len(failed)} streams failed within {max(s for _, s in failed) * 1000:.0f} ms, "
          f"6 new requests answered by the other; restarted replica routable again after {rejoined_in:.1f} s")
    record_property("smg_replica_kill_streams_failed_s", max(s for _, s in failed))
    record_property("smg_replica_rejoin_s", rejoined_in)


def test_the_contracts_health_is_the_workers(fleet: Fleet) -> None:
    """A replica whose worker dies says so on SMG's HealthCheck and grpc.health; SMG stops routing to it."""
    replica = fleet.replicas[1]
    url = f"grpc://{replica.scheduler.target}"

    async def health() -> tuple[sg.HealthCheckResponse, int]:
        async with channel(replica.scheduler.target) as ch:
            answer = await sg_grpc.SglangSchedulerStub(ch).HealthCheck(sg.HealthCheckRequest(), timeout=10)
            status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            return answer, status.status

    replica.worker.kill()
    answer, status = asyncio.run(_until(health, lambda h: not h[0].healthy))
    assert (answer.healthy, answer.message, status) == (
        False, "scheduler has no worker connected", health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + 10
    while routable(fleet.gateway)[url] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert routable(fleet.gateway)[url] is False

    replica.worker.start()
    wait_status(replica.scheduler, "SERVING")
    wait_routable(fleet.gateway, [replica.scheduler.target])
    answer, status = asyncio.run(health())
    assert (answer.healthy, status) == (True, health_pb2.HealthCheckResponse.SERVING)
