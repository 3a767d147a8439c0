"""`llmrpc serve --replicas N`: N replicas (worker ranks and a scheduler each) behind the SMG gateway.

The planned layout of ports, sockets, TP groups and GPUs for N replicas x TP ranks (no GPU
needed); the real stack of two replicas on the tiny model answering a greedy completion through
SMG's HTTP port, both schedulers routable, SIGTERM ending every process; and, without `smg`,
a fast failure that says how to install it and starts nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from llmrpc.services import cli
from llmrpc.services.client import check_health
from llmrpc.services.launcher import SMG_INSTALL, GatewayConfig, Launcher, routable, wait_model, wait_routable
from llmrpc.services.local_stack import LocalStack
from tests.services.test_launcher import process_group, wait_for


def test_gpu_of_each_rank_is_replica_times_tp_plus_rank() -> None:
    layout = lambda replicas, tp, gpus: [[cli.gpu_index(r, k, tp, gpus) for k in range(tp)] for r in range(replicas)]
    assert layout(4, 2, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout(2, 1, 2) == [[0], [1]]
    assert layout(1, 4, 4) == [[0, 1, 2, 3]]  # one replica: rank k on GPU k, as before --replicas
    assert layout(3, 2, 4) == [[0, 1], [2, 3], [0, 1]]  # fewer GPUs than ranks wrap around
    assert layout(2, 2, 0) == [[0, 0], [0, 0]]  # a host that shows none (or only its own) gets cuda:0


def test_planned_layout_of_replicas_times_tp_ranks(tmp_path: Path) -> None:
    import torch

    (tmp_path / "model").mkdir()
    args = cli.build_parser().parse_args([
        "serve", "--model", str(tmp_path / "model"), "--replicas", "3", "--tp", "2", "--device", "cuda",
        "--scheduler-port", "6000", "--worker-port", "7000", "--http-port", "8100", "--host", "0.0.0.0"])
    config = cli.serve_config(args, str(tmp_path))
    assert config.tokenizer is None  # SMG is the front door; llmrpc's would reach one replica only
    assert len(config.replicas) == 3
    rendezvous = set()
    for r, replica in enumerate(config.replicas):
        assert replica.scheduler.port == 6000 + r
        assert [w.port for w in replica.workers] == [7000 + 2 * r, 7001 + 2 * r]
        assert [w.unix_socket for w in replica.workers] == [str(tmp_path / f"worker{2 * r + k}.sock") for k in (0, 1)]
        assert replica.scheduler.workers == tuple(f"unix:{w.unix_socket}" for w in replica.workers)
        assert [w.engine.tp_rank for w in replica.workers] == [0, 1]
        assert [w.engine.tp_size for w in replica.workers] == [2, 2]
        assert [w.engine.device for w in replica.workers] == [
            f"cuda:{cli.gpu_index(r, k, 2, torch.cuda.device_count())}" for k in (0, 1)]
        (addr,) = {w.engine.dist_init_addr for w in replica.workers}  # one rendezvous per TP group
        rendezvous.add(addr)
    assert len(rendezvous) == 3 and None not in rendezvous
    gateway = config.gateway
    assert isinstance(gateway, GatewayConfig)
    assert (gateway.host, gateway.port, gateway.policy, gateway.model_path) == (
        "0.0.0.0", 8100, "cache_aware", str(tmp_path / "model"))
    argv = gateway.argv()
    urls = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
    assert urls == ["grpc://127.0.0.1:6000", "grpc://127.0.0.1:6001", "grpc://127.0.0.1:6002"]
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"  # SMG's metrics stay on loopback

    moved = config.with_scheduler(dataclasses.replace(config.scheduler, port=6100))
    assert [r.scheduler.port for r in moved.replicas] == [6100, 6001, 6002]
    assert moved.replicas[1:] == config.replicas[1:] and moved.gateway == config.gateway

    launcher = Launcher(config)
    assert [c.name for c in launcher.children] == [
        *(f"replica {r} {name}" for r in range(3) for name in ("worker rank 0", "worker rank 1", "scheduler")),
        "gateway"]
    assert [s.group for s in config.services()][:3] == ["replica 0 workers", "replica 0 workers", None]
    assert launcher.child("gateway").health_url == "http://127.0.0.1:8100/readiness"

    # One replica is today's stack: unprefixed names, the tokenizer in front, no gateway.
    single = cli.serve_config(cli.build_parser().parse_args(["serve", "--model", str(tmp_path / "model")]),
                              str(tmp_path))
    assert single.gateway is None and single.tokenizer is not None
    assert [s.name for s in single.services()] == ["worker rank 0", "scheduler", "tokenizer"]


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--dist-init-addr", "127.0.0.1:29555"], "--dist-init-addr"),
    (["--replicas", "2", "--http-port", "0"], "--replicas needs --http-port"),
    (["--replicas", "2", "--api-key", "k"], "not supported with --replicas"),
])
def test_replicas_refuse_what_they_cannot_honour(tmp_path: Path, flags: list[str], message: str) -> None:
    (tmp_path / "model").mkdir()
    args = cli.build_parser().parse_args(["serve", "--model", str(tmp_path / "model"), *flags])
    with pytest.raises(ValueError, match=message):
        cli.serve_config(args, str(tmp_path))


def test_without_smg_replicas_fail_fast_with_the_install_message(tmp_path: Path) -> None:
    """Run by this venv's packages on the base interpreter, with PATH lacking smg: nothing finds it."""
    base = getattr(sys, "_base_executable", sys.executable)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and shutil.which("smg", path=d) is None)
    assert shutil.which("smg", path=path) is None and shutil.which("smg", path=str(Path(base).parent)) is None
    (tmp_path / "model").mkdir()
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
            "from llmrpc.services.cli import main; main(sys.argv[1:])")
    start = time.monotonic()
    serve = subprocess.Popen([base, "-c", code, sysconfig.get_paths()["purelib"], "serve", "--model",
                              str(tmp_path / "model"), "--replicas", "2", "--device", "cpu"],
                             env={**os.environ, "PATH": path}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    out, err = serve.communicate(timeout=60)
    assert serve.returncode == 1, (out, err)
    assert f"the SMG gateway (`smg`) is not installed: {SMG_INSTALL}" in err
    assert "pip install smg==1.13.0" in err and "Traceback" not in err
    assert not process_group(serve.pid)  # no child was started
    assert time.monotonic() - start < 30


def test_two_replicas_behind_smg_answer_and_stop_on_sigterm(tmp_path: Path, tiny_model: Path) -> None:
    stack = LocalStack.start(tmp_path, tiny_model, "--max-total-tokens", "4096", "--max-running-requests", "8",
                             replicas=2)
    try:
        pgid = stack.process.pid
        wait_routable(stack.serve, list(stack.schedulers))
        model = wait_model(stack.serve)
        assert routable(stack.serve) == {f"grpc://{s}": True for s in stack.schedulers}  # both, and only them

        def complete() -> dict:
            body = json.dumps({"model": model, "prompt": "Rivers run to the sea because", "max_tokens": 8,
                               "temperature": 0, "ignore_eos": True}).encode()
            request = urllib.request.Request(f"{stack.http}/v1/completions", body,
                                             {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                assert answer.status == 200
                return json.load(answer)

        first, second = complete(), complete()
        assert first["choices"][0]["finish_reason"] == "length" and first["usage"]["completion_tokens"] == 8
        assert first["choices"][0]["text"] and first["choices"][0]["text"] == second["choices"][0]["text"]

        commands = list(process_group(pgid).values())
        count = lambda name: sum(f" {name} " in c for c in commands)
        assert (count("worker"), count("scheduler"), count("tokenizer")) == (2, 2, 0), commands
        assert sum(c.startswith("smg::router") for c in commands) == 1, commands  # smg's process title
        wait_for(lambda: "as 2 replicas behind the SMG gateway (cache_aware)" in stack.log(), 10, "serve's announcement")

        stack.process.send_signal(signal.SIGTERM)  # to `llmrpc serve` only: it stops its children itself
        assert stack.process.wait(30) == 0
        wait_for(lambda: not process_group(pgid), 10, f"every process of group {pgid} to end")
        for target in (*stack.schedulers, *stack.workers):
            assert not check_health(target, timeout=1.0)
    finally:
        stack.stop()
