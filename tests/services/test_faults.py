"""Faults with real processes and real signals, on a stack secured end to end.

One worker, one scheduler and two tokenizer replicas, each its own `llmrpc`
process so a test can SIGKILL exactly one. Every link is TLS: the worker and the
scheduler require client certificates (mutual TLS), the tokenizers serve TLS on
their public ports, and replica B also requires the API key. The measured times
are printed (run with -s) and recorded as test properties.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from llmrpc.services.rpc import free_port
from tests.services.conftest import Certificates, health_status, service, wait_status

API_KEY = "test-key-0123456789"
SECRET_PROMPT = "my card number is 4111-1111 and my zebra is quasar"
SLOTS = 8
MAX_QUEUED = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model, certificates: Certificates):
    tmp = tmp_path_factory.mktemp("faults")
    tls = ["--tls-cert", certificates.cert, "--tls-key", certificates.key, "--tls-ca", certificates.ca]
    worker = service(tmp, "worker", "--model", tiny_model, "--device", "cpu", "--max-running-requests", SLOTS,
                     "--max-total-tokens", 16384, *tls)
    scheduler = service(tmp, "scheduler", "--workers", worker.target, "--max-queued-requests", MAX_QUEUED,
                        "--check-kv-invariants", *tls)
    replica_a = service(tmp, "tokenizer", "--model", tiny_model, "--scheduler", scheduler.target, *tls,
                        "--http-port", free_port())
    http_port = free_port()
    replica_b = service(tmp, "tokenizer", "--model", tiny_model, "--scheduler", scheduler.target, *tls,
                        "--api-key", API_KEY, "--http-port", http_port)
    replica_b.http = f"https://127.0.0.1:{http_port}"
    services = dict(worker=worker, scheduler=scheduler, a=replica_a, b=replica_b)
    try:
        for svc in services.values():
            svc.start()
        creds = certificates.channel_credentials()
        for svc in services.values():
            wait_status(svc, "SERVING", creds)
        yield services
    finally:
        for svc in reversed(services.values()):
            svc.stop()


def _tokens(n: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(tokens=pb.TokenIds(ids=[(11 * i) % 49000 + 5 for i in range(n)]),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))


KEY = (("authorization", f"Bearer {API_KEY}"),)


class Client:
    """Streams on one target; records how each ended and when."""

    def __init__(self, target: str, creds: grpc.ChannelCredentials, metadata=()) -> None:
        self.channel = channel(target, creds)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = metadata

    async def stream(self, request: pb.GenerateRequest, started: asyncio.Event | None = None):
        """(code, tokens, monotonic end time)."""
        tokens = 0
        try:
            async for response in self.stub.Generate(request, timeout=60, metadata=self.metadata):
                tokens += len(response.token_ids)
                if started is not None and tokens:
                    started.set()
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        return code, tokens, time.monotonic()

    async def info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=self.metadata)


async def _no_leak(client: Client, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.info()
        if (info.requests_running == info.requests_waiting == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (info.requests_running, info.requests_waiting) == (0, 0)
    assert info.kv_pages_free + info.kv_pages_cached == info.kv_pages_total


async def _started(events: list[asyncio.Event], tasks: list[asyncio.Task]) -> None:
    """Waits until every stream has received tokens; fails at once if one ended before."""
    waiting = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([waiting, *tasks], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:
        waiting.cancel()
        ended = [t.result() for t in tasks if t.done()]
        raise AssertionError(f"streams did not all start; ended early: {ended}")


def test_api_key_and_tls_on_the_public_port(stack, certificates: Certificates) -> None:
    async def run():
        creds = certificates.channel_credentials(client_cert=False)  # a public client: CA only
        results = {}
        for name, metadata in (("none", ()), ("wrong", (("authorization", "Bearer nope"),)),
                               ("basic", (("authorization", f"Basic {API_KEY}"),))):
            client = Client(stack["b"].target, creds, metadata)
            results[name] = (await client.stream(_tokens(4, 2)))[0]
            try:
                await client.info()
                results[name + "-info"] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                results[name + "-info"] = exc.code()
            await client.channel.close()
        good = Client(stack["b"].target, creds, KEY)
        text = [r async for r in good.stub.Generate(pb.GenerateRequest(
            text=SECRET_PROMPT, sampling=pb.SamplingParams(max_tokens=3, temperature=0.0)), timeout=30, metadata=KEY)]
        await good.channel.close()
        plain = Client(stack["b"].target, None, KEY)  # no TLS at all
        results["plaintext"] = (await plain.stream(_tokens(4, 2)))[0]
        await plain.channel.close()
        no_cert = Client(stack["scheduler"].target, creds)  # the scheduler wants a client certificate
        results["scheduler-without-client-cert"] = (await no_cert.stream(_tokens(4, 2)))[0]
        await no_cert.channel.close()
        return results, text

    results, text = asyncio.run(run())
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert {k: v for k, v in results.items() if k[:4] in ("none", "wron", "basi")} == {
        "none": unauth, "none-info": unauth, "wrong": unauth, "wrong-info": unauth,
        "basic": unauth, "basic-info": unauth}
    assert results["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert results["scheduler-without-client-cert"] == grpc.StatusCode.UNAVAILABLE
    assert sum(len(r.token_ids) for r in text) == 3 and text[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Probes need no key.
    assert health_status(stack["b"].target, certificates.channel_credentials(client_cert=False)) == "SERVING"
    # Nothing a user sent or got back is logged at INFO.
    outputs = "".join(r.text for r in text)
    for svc in stack.values():
        log = svc.log()
        assert SECRET_PROMPT not in log and (not outputs.strip() or outputs not in log), svc.name


def _http_post(url: str, body: dict, ca: str, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cafile=ca)) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_key_and_tls_on_the_http_port(stack, certificates: Certificates) -> None:
    url = stack["b"].http + "/v1/completions"
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    ca = str(certificates.ca)
    assert _http_post(url, body, ca, None)[0] == 401
    assert _http_post(url, body, ca, "wrong")[0] == 401
    status, answer = _http_post(url, body, ca, API_KEY)
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_full_queue_is_refused_at_once(stack, certificates: Certificates) -> None:
    async def run():
        client = Client(stack["scheduler"].target, certificates.channel_credentials())
        started = [asyncio.Event() for _ in range(SLOTS)]
        running = [asyncio.create_task(client.stream(_tokens(8, 1500), e)) for e in started]
        await _started(started, running)
        waiting = [asyncio.create_task(client.stream(_tokens(8, 1500))) for _ in range(MAX_QUEUED)]
        while (await client.info()).requests_waiting < MAX_QUEUED:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        refused = await asyncio.gather(*(client.stream(_tokens(8, 4)) for _ in range(3)))
        for task in running + waiting:
            task.cancel()
        await asyncio.gather(*running, *waiting, return_exceptions=True)
        await _no_leak(client)
        await client.channel.close()
        return refused, t0

    refused, t0 = asyncio.run(run())
    assert [code for code, _, _ in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    took = max(end for _, _, end in refused) - t0
    print(f"queue full: refused in {took * 1000:.1f} ms")
    assert took < 0.5


def test_dying_tokenizer_replica_affects_only_its_own_streams(stack, certificates: Certificates,
                                                              record_property) -> None:
    creds = certificates.channel_credentials()

    async def run():
        a, b = Client(stack["a"].target, creds), Client(stack["b"].target, creds, KEY)
        started = [asyncio.Event() for _ in range(8)]
        on_a = [asyncio.create_task(a.stream(_tokens(6, 400), started[i])) for i in range(4)]
        on_b = [asyncio.create_task(b.stream(_tokens(6, 400), started[4 + i])) for i in range(4)]
        await _started(started, on_a + on_b)
        t0 = time.monotonic()
        stack["a"].kill()
        results_a = await asyncio.gather(*on_a)
        results_b = await asyncio.gather(*on_b)
        await _no_leak(Client(stack["scheduler"].target, creds))
        for c in (a, b):
            await c.channel.close()
        return t0, results_a, results_b

    t0, results_a, results_b = asyncio.run(run())
    assert [code for code, _, _ in results_a] == [grpc.StatusCode.UNAVAILABLE] * 4
    assert [(code, n) for code, n, _ in results_b] == [(grpc.StatusCode.OK, 400)] * 4
    failed_in = max(end for _, _, end in results_a) - t0
    print(f"tokenizer replica killed: its streams failed in {failed_in * 1000:.0f} ms; the other replica's 4 "
          "streams finished with all 400 tokens")
    record_property("replica_streams_failed_s", failed_in)
    stack["a"].start()
    wait_status(stack["a"], "SERVING", creds)


def test_worker_killed_mid_stream(stack, certificates: Certificates, record_property) -> None:
    creds = certificates.channel_credentials()

    async def run():
        b, s = Client(stack["b"].target, creds, KEY), Client(stack["scheduler"].target, creds)
        started = [asyncio.Event() for _ in range(8)]
        streams = [asyncio.create_task((b if i % 2 else s).stream(_tokens(6, 1500), started[i])) for i in range(8)]
        await _started(started, streams)
        t0 = time.monotonic()
        stack["worker"].kill()
        results = await asyncio.gather(*streams)
        status = health_status(stack["scheduler"].target, creds)
        for c in (b, s):
            await c.channel.close()
        return t0, results, status

    t0, results, status = asyncio.run(run())
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 8
    failed_in = max(end for _, _, end in results) - t0
    assert failed_in < 2.0
    assert status == "NOT_SERVING"
    not_serving_b = wait_status(stack["b"], "NOT_SERVING", creds, timeout=5)

    t1 = time.monotonic()
    stack["worker"].start()
    wait_status(stack["scheduler"], "SERVING", creds)
    back_in = time.monotonic() - t1
    wait_status(stack["b"], "SERVING", creds, timeout=10)

    async def again():
        b = Client(stack["b"].target, creds, KEY)
        result = await b.stream(_tokens(6, 20))
        await _no_leak(Client(stack["scheduler"].target, creds))
        await b.channel.close()
        return result

    code, n, _ = asyncio.run(again())
    assert (code, n) == (grpc.StatusCode.OK, 20)
    print(f"worker SIGKILL: 8 streams UNAVAILABLE within {failed_in * 1000:.0f} ms, scheduler NOT_SERVING at once, "
          f"tokenizer NOT_SERVING after {not_serving_b:.2f} s; restarted worker serving again after {back_in:.1f} s")
    record_property("worker_kill_streams_failed_s", failed_in)
    record_property("worker_restart_to_serving_s", back_in)


def test_scheduler_killed_mid_stream(stack, certificates: Certificates, record_property) -> None:
    creds = certificates.channel_credentials()

    async def run():
        b = Client(stack["b"].target, creds, KEY)
        started = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.create_task(b.stream(_tokens(6, 1500), e)) for e in started]
        await _started(started, streams)
        t0 = time.monotonic()
        stack["scheduler"].kill()
        results = await asyncio.gather(*streams)
        await b.channel.close()
        return t0, results

    t0, results = asyncio.run(run())
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 4
    failed_in = max(end for _, _, end in results) - t0
    assert failed_in < 2.0
    not_serving = wait_status(stack["b"], "NOT_SERVING", creds, timeout=5)

    t1 = time.monotonic()
    stack["scheduler"].start()
    wait_status(stack["b"], "SERVING", creds)
    back_in = time.monotonic() - t1

    async def again():
        b = Client(stack["b"].target, creds, KEY)
        result = await b.stream(_tokens(6, 20))
        await b.channel.close()
        return result

    code, n, _ = asyncio.run(again())
    assert (code, n) == (grpc.StatusCode.OK, 20)
    print(f"scheduler SIGKILL: tokenizer streams UNAVAILABLE within {failed_in * 1000:.0f} ms, tokenizer "
          f"NOT_SERVING after {not_serving:.2f} s; serving again {back_in:.1f} s after the scheduler restarted")
    record_property("scheduler_kill_streams_failed_s", failed_in)
    record_property("scheduler_restart_to_serving_s", back_in)


def test_serve_with_tls_and_api_key(tmp_path, tiny_model, certificates: Certificates) -> None:
    """`llmrpc serve` passes TLS and the key to its tokenizer (the key by environment) and probes it over TLS."""
    port = free_port()
    svc = service(tmp_path, "serve", "--model", tiny_model, "--device", "cpu", "--scheduler-port", free_port(),
                  "--worker-port", free_port(), "--http-port", free_port(), "--tls-cert", certificates.cert,
                  "--tls-key", certificates.key, "--api-key", API_KEY)
    svc.target = f"127.0.0.1:{port}"
    svc.argv[svc.argv.index("--port") + 1] = str(port)
    creds = certificates.channel_credentials(client_cert=False)
    try:
        svc.start()
        wait_status(svc, "SERVING", creds)

        async def run():
            results = []
            for metadata in ((), KEY):
                client = Client(svc.target, creds, metadata)
                results.append(await client.stream(_tokens(4, 3)))
                await client.channel.close()
            return results

        (refused, _, _), (ok, n, _) = asyncio.run(run())
        assert refused == grpc.StatusCode.UNAUTHENTICATED and (ok, n) == (grpc.StatusCode.OK, 3)
        children = _children(svc.process.pid)
        assert len(children) == 3  # worker, scheduler, tokenizer
        for pid in children:
            assert API_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        svc.stop()


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
