"""`llmrpc serve` as a child process tree on free loopback ports: what tests and benchmarks start.

`LocalStack.start` runs the real command in its own process group, waits until the
tokenizer's front door serves, and retries on fresh ports when a port picked free was
taken before the stack bound it. `stop` ends the whole group, whatever state it is in:
SIGTERM (serve stops its children in order), then SIGKILL for anything left after 20 s.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmrpc.services.client import check_health
from llmrpc.services.rpc import free_port


@dataclass
class LocalStack:
    """A running `llmrpc serve` process tree."""

    process: subprocess.Popen
    tokenizer: str  # host:port of each service
    scheduler: str
    workers: list[str]
    log_path: Path
    http: str = ""  # base URL of the OpenAI-compatible HTTP port

    @classmethod
    def start(cls, log_dir: Path, model: Path | str, *extra: str, tp: int = 1, device: str = "cpu",
              timeout: float = 300.0, attempts: int = 3) -> "LocalStack":
        """Starts `llmrpc serve --model MODEL EXTRA...`; the log goes to a file under `log_dir`."""
        for attempt in range(1, attempts + 1):
            try:
                return cls._start_once(Path(log_dir), model, extra, tp, device, timeout)
            except RuntimeError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(cls, log_dir: Path, model: Path | str, extra: tuple[str, ...], tp: int, device: str,
                    timeout: float) -> "LocalStack":
        port, sched_port, http_port, worker_port = free_port(), free_port(), free_port(), free_port()
        log_path = log_dir / f"serve-{port}.log"
        argv = [sys.executable, "-m", "llmrpc.services.cli", "serve", "--model", str(model),
                "--port", str(port), "--scheduler-port", str(sched_port), "--worker-port", str(worker_port),
                "--http-port", str(http_port), "--tp", str(tp), "--device", device, *extra]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack = cls(process, f"127.0.0.1:{port}", f"127.0.0.1:{sched_port}",
                    [f"127.0.0.1:{worker_port + r}" for r in range(tp)], log_path, f"http://127.0.0.1:{http_port}")
        deadline = time.monotonic() + timeout
        try:
            while not check_health(stack.tokenizer, timeout=1.0):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llmrpc serve did not come up:\n{stack.log()[-4000:]}")
                time.sleep(0.3)
        except BaseException:  # also Ctrl-C or SIGTERM while waiting: nothing is left running
            stack.stop()
            raise
        return stack

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGTERM, not SIGINT: a parent started in the background may pass SIGINT down ignored.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
