"""The launcher: every `llmrpc serve` flag reaches the child that takes it; and, on a real stack,
a killed worker comes back and SIGINT ends every process.

The two stack tests share one small stack (its own process group, see `start_stack`); the
SIGINT test stops it, so it comes last.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from llmrpc.services import cli
from llmrpc.services.client import build_request, check_health
from llmrpc.services.launcher import GatewayConfig, Launcher
from llmrpc.services.local_stack import LocalStack
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2_grpc

from ..conftest import start_stack

PROMPT = "Write one sentence about rivers."

# Values for the serve flags whose changed value the test cannot derive (a flag given more does).
SAMPLES = {
    "--device": ["--device", "cuda:1"],
    "--dist-init-addr": ["--dist-init-addr", "127.0.0.1:29555"],
    "--host": ["--host", "0.0.0.0"],
    "--api-key": ["--api-key", "s3cret-key"],
    "--tls-cert": ["--tls-cert", "{tmp}/cert.pem", "--tls-key", "{tmp}/key.pem"],
    "--tls-key": ["--tls-cert", "{tmp}/cert.pem", "--tls-key", "{tmp}/key.pem"],
    "--model": ["--model", "{tmp}/other-model"],
}


def changed(action: argparse.Action, tmp: Path) -> list[str]:
    """Arguments that set `action`'s flag to a value other than its default."""
    flag = action.option_strings[0]
    if flag in SAMPLES:
        return [a.format(tmp=tmp) for a in SAMPLES[flag]]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    if action.type is not None:  # a number: one more than the default
        default = action.type(action.default) if isinstance(action.default, str) else action.default
        return [flag, str((default or 0) + 1)]
    raise AssertionError(f"{flag}: add a sample value to SAMPLES")


def test_every_serve_flag_reaches_the_child_that_takes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag of `llmrpc serve` changes what serve runs, and every child, parsing the command line and
    environment the launcher starts it with, builds exactly the config serve planned for it."""
    for name in [n for n in os.environ if n.startswith("LLMRPC_") and n != "LLMRPC_CACHE_DIR"]:
        monkeypatch.delenv(name)
    for name in ("model", "other-model"):
        (tmp_path / name).mkdir()
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM")  # read by the launcher's health probe only

    def plan(*argv: str) -> Launcher:
        args = cli.build_parser().parse_args(["serve", "--model", str(tmp_path / "model"), *argv])
        return Launcher(cli.serve_config(args, str(tmp_path)))

    base = plan()
    assert [c.name for c in base.children] == ["worker rank 0", "scheduler", "tokenizer"]
    flags = [a for a in cli.command_parser("serve")._actions if a.option_strings and a.dest != "help"]
    assert {"--page-size", "--max-context", "--tp", "--schedule-policy", "--overlap-depth",
            "--disable-overlap"} <= {f.option_strings[0] for f in flags}
    for action in flags:
        argv = changed(action, tmp_path)
        launcher = plan(*argv)
        assert launcher.config != base.config, f"serve {' '.join(argv)}: nothing serve runs changed"
        for service, child in zip(launcher.config.services(), launcher.children, strict=True):
            if isinstance(service.config, GatewayConfig):  # --replicas: SMG, started on its config's command line
                assert child.argv == service.config.argv() and child.health_url.endswith("/readiness")
                continue
            assert child.argv[:4] == [*cli.COMMAND, service.command]
            assert "s3cret-key" not in child.argv  # secrets go by environment
            with monkeypatch.context() as env:
                for name, value in (child.env or {}).items():
                    env.setenv(name, value)
                args = cli.build_parser().parse_args(child.argv[3:])  # the child's own defaults from its env
            assert cli.service_config(args) == service.config, f"serve {' '.join(argv)}: {service.name} differs"
            assert args.log_level == launcher.config.log_level
            assert args.trace == launcher.config.trace


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
