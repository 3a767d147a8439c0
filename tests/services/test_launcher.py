"""`llmrpc serve` as a supervisor, on a real stack: a killed worker comes back; SIGINT ends every process.

Both tests share one small stack (its own process group, see `start_stack`); the
SIGINT test stops it, so it comes last.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from llmrpc.services.client import build_request, check_health
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2_grpc

from llmrpc.services.local_stack import LocalStack

from ..conftest import start_stack

PROMPT = "Write one sentence about rivers."


def process_group(pgid: int) -> dict[int, str]:
    """The live (not zombie) processes of a process group, pid -> command line."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = {}
    if psutil is not None:
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found[p.pid] = " ".join(p.info["cmdline"] or [])
            except (ProcessLookupError, psutil.Error):
                continue
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # the fields after "(comm)"
        if int(pgrp) == pgid and state != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def services_of(stack: LocalStack) -> dict[str, list[int]]:
    """pids of the stack's service processes by service name, found by command line."""
    found: dict[str, list[int]] = {"worker": [], "scheduler": [], "tokenizer": []}
    for pid, cmdline in process_group(stack.process.pid).items():
        for name in found:
            if f" {name} " in cmdline:
                found[name].append(pid)
    return found


async def greedy_text(target: str) -> str:
    async with channel(target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        request = build_request(PROMPT, max_tokens=12, temperature=0.0)
        return "".join([r.text async for r in stub.Generate(request, timeout=60)])


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    stack = start_stack(tmp_path_factory.mktemp("launcher"), default_model_dir, "--max-total-tokens", "2048")
    yield stack
    stack.stop()


def test_killed_worker_is_restarted_and_the_stack_serves_again(stack: LocalStack) -> None:
    before = asyncio.run(greedy_text(stack.tokenizer))
    assert before
    (worker,) = services_of(stack)["worker"]

    async def kill_mid_stream() -> grpc.aio.AioRpcError:
        async with channel(stack.tokenizer) as ch:
            call = generation_pb2_grpc.GenerationStub(ch).Generate(
                build_request(PROMPT, max_tokens=1500, temperature=0.0, ignore_eos=True), timeout=60)
            await call.read()
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
                    pass
            return error.value

    killed_at = time.monotonic()
    error = asyncio.run(kill_mid_stream())
    # The request in flight fails at once, loudly, and both services in front stop serving.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert not check_health(stack.scheduler, timeout=2.0)
    wait_for(lambda: not check_health(stack.tokenizer, timeout=1.0), 10, "the tokenizer to report NOT_SERVING")
    wait_for(lambda: "worker rank 0 killed by SIGKILL" in stack.log(), 10, "the launcher to report the kill")

    after = None
    while after is None:
        try:
            after = asyncio.run(greedy_text(stack.tokenizer))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() - killed_at < 60, "the stack did not serve again within 60 s"
            time.sleep(0.5)
    assert after == before  # the restarted worker serves the same model
    (restarted,) = services_of(stack)["worker"]
    assert restarted != worker
    assert check_health(stack.scheduler) and check_health(stack.workers[0])


def test_sigint_stops_every_process(stack: LocalStack) -> None:
    pgid = stack.process.pid
    running = services_of(stack)
    assert all(len(pids) == 1 for pids in running.values()), running
    stack.process.send_signal(signal.SIGINT)  # to `llmrpc serve` only: it must stop its children itself
    assert stack.process.wait(30) == 0
    wait_for(lambda: not process_group(pgid), 10, f"every process of group {pgid} to end")
    for target in (stack.tokenizer, stack.scheduler, *stack.workers):
        assert not check_health(target, timeout=1.0)
