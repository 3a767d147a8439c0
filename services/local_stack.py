"""`llmrpc serve` as a child process tree on free loopback ports: what tests and benchmarks start.

`LocalStack.start` runs the real command through the launcher (services/launcher.py) in its
own process group, waits until the tokenizer's front door serves (with `replicas` > 1, until the
SMG gateway's HTTP `/readiness` answers), and retries on fresh ports
when a port picked free was taken before the stack bound it. `stop` ends the whole group,
whatever state it is in: SIGTERM (serve stops its children in order), then SIGKILL for
anything left after 20 s.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from llmrpc.services.cli import COMMAND
from llmrpc.services.launcher import ServiceProcess, start_on_fresh_ports
from llmrpc.services.rpc import free_port


@dataclass
class LocalStack:
    """A running `llmrpc serve` process tree."""

    serve: ServiceProcess
    tokenizer: str  # host:port of each service (with replicas > 1, no tokenizer: the gateway's)
    scheduler: str  # replica 0's
    workers: list[str]  # every replica's ranks, in the stack's rank order
    http: str = ""  # base URL of the OpenAI-compatible HTTP port (the gateway's with replicas > 1)
    schedulers: tuple[str, ...] = ()  # each replica's

    @classmethod
    def start(cls, log_dir: Path, model: Path | str, *extra: str, tp: int = 1, device: str = "cpu",
              timeout: float = 300.0, attempts: int = 3, replicas: int = 1) -> LocalStack:
        """Starts `llmrpc serve --model MODEL --replicas REPLICAS EXTRA...`; the log goes to a file under `log_dir`."""
        return start_on_fresh_ports(
            lambda: cls._start_once(Path(log_dir), model, extra, tp, device, timeout, replicas), attempts)

    @classmethod
    def _start_once(cls, log_dir: Path, model: Path | str, extra: tuple[str, ...], tp: int, device: str,
                    timeout: float, replicas: int) -> LocalStack:
        # Replica r's scheduler is on sched_port + r, its ranks on worker_port + r * tp + k: ports picked
        # free one by one, the ones above them are most likely free too (else a retry picks again).
        port, sched_port, http_port, worker_port = free_port(), free_port(), free_port(), free_port()
        argv = [*COMMAND, "serve", "--model", str(model), "--port", str(port), "--scheduler-port", str(sched_port),
                "--worker-port", str(worker_port), "--http-port", str(http_port), "--tp", str(tp),
                "--device", device, *(("--replicas", str(replicas)) if replicas > 1 else ()), *extra]
        http = f"http://127.0.0.1:{http_port}"
        front = f"127.0.0.1:{http_port}" if replicas > 1 else f"127.0.0.1:{port}"
        serve = ServiceProcess("llmrpc serve", argv, front, log_path=log_dir / f"serve-{port}.log",
                               own_group=True, http=http, health_url=f"{http}/readiness" if replicas > 1 else "")
        stack = cls(serve, serve.target, f"127.0.0.1:{sched_port}",
                    [f"127.0.0.1:{worker_port + i}" for i in range(replicas * tp)], serve.http,
                    tuple(f"127.0.0.1:{sched_port + r}" for r in range(replicas)))
        try:
            serve.start().wait_serving(timeout)
        except BaseException:  # also Ctrl-C or SIGTERM while waiting: nothing is left running
            stack.stop()
            raise
        return stack

    @property
    def process(self) -> subprocess.Popen:
        assert self.serve.process is not None
        return self.serve.process

    @property
    def log_path(self) -> Path:
        assert self.serve.log_path is not None
        return self.serve.log_path

    def log(self) -> str:
        return self.serve.log()

    def stop(self) -> None:
        self.serve.stop(timeout=20.0)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
