"""Shared fixtures: the default model (fetched once into the user cache) and real stacks.

Service tests start real processes on loopback ports they pick themselves and
stop them all at teardown, whatever happened.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmrpc.services.client import check_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, through the project's own fetch and conversion."""
    from llmrpc.engine.default_model import ensure_default_model
    from llmrpc.services.cli import default_cache_dir

    return ensure_default_model(default_cache_dir())


@dataclass
class Stack:
    """A running `llmrpc serve` process tree."""

    process: subprocess.Popen
    tokenizer: str
    scheduler: str
    workers: list[str]
    log_path: Path
    http: str = ""  # base URL of the OpenAI-compatible HTTP port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start_stack(tmp: Path, model: Path | str, *extra: str, tp: int = 1, timeout: float = 300.0,
                attempts: int = 3) -> Stack:
    """Starts `llmrpc serve` on free loopback ports and waits until the front door serves.

    A port picked free can be taken by someone else before the stack binds it, so a
    stack that fails to start is retried on fresh ports.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_stack_once(tmp, model, *extra, tp=tp, timeout=timeout)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_stack_once(tmp: Path, model: Path | str, *extra: str, tp: int, timeout: float) -> Stack:
    port, sched_port, http_port = free_port(), free_port(), free_port()
    worker_port = free_port()
    log_path = tmp / f"serve-{port}.log"
    argv = [sys.executable, "-m", "llmrpc.services.cli", "serve", "--model", str(model),
            "--port", str(port), "--scheduler-port", str(sched_port), "--worker-port", str(worker_port),
            "--http-port", str(http_port),
            "--tp", str(tp), "--device", "cpu", "--check-kv-invariants", *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack = Stack(process, f"127.0.0.1:{port}", f"127.0.0.1:{sched_port}",
                  [f"127.0.0.1:{worker_port + r}" for r in range(tp)], log_path, f"http://127.0.0.1:{http_port}")
    deadline = time.monotonic() + timeout
    while not check_health(stack.tokenizer, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            stack.stop()
            raise RuntimeError(f"llmrpc serve did not come up:\n{stack.log()[-4000:]}")
        time.sleep(0.3)
    return stack


@pytest.fixture(scope="session")
def default_stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    stack = start_stack(tmp_path_factory.mktemp("stack"), default_model_dir)
    yield stack
    stack.stop()
