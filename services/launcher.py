"""`llmrpc serve`: the three services as supervised local processes on one machine.

Starts the worker ranks, the scheduler and the tokenizer, each its own process
running the same `llmrpc <service>` command a container runs; waits for each to
report SERVING; restarts a child that dies (with backoff) and says why it died;
stops every child on Ctrl-C or SIGTERM. With `--tp N` the worker ranks are one
group: when one dies, the others are stuck in (or bound to) a process group with a
dead peer, so the whole group is stopped and restarted together.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmrpc.services.client import check_health
from llmrpc.services.rpc import free_port

log = logging.getLogger("llmrpc.serve")

STARTUP_TIMEOUT_S = 600.0
MAX_BACKOFF_S = 30.0


def exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the same way Ctrl-C does


@dataclass
class Child:
    """One supervised service process."""

    name: str
    argv: list[str]
    health_target: str
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = field(default=0.0)
    tls_root: bytes | None = None  # the health probe trusts this certificate (a TLS public port)
    env: dict[str, str] | None = None  # extra environment (secrets stay out of the process list)
    group: str | None = None  # children of one group die and restart together (the TP ranks)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env={**os.environ, **self.env} if self.env else None)
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Launcher:
    def __init__(self, args: argparse.Namespace, model_path: str) -> None:
        self.args = args
        self.model_path = model_path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="llmrpc-"))
        self.children = self._plan()

    def _service(self, *argv: object) -> list[str]:
        return [sys.executable, "-m", "llmrpc.services.cli", *map(str, argv), "--log-level", self.args.log_level]

    def _plan(self) -> list[Child]:
        a = self.args
        engine_flags = [
            "--device", a.device, "--dtype", a.dtype, "--page-size", a.page_size,
            "--max-total-tokens", a.max_total_tokens, "--max-running-requests", a.max_running_requests,
            "--attention-backend", a.attention_backend, "--cuda-graph-max-bs", a.cuda_graph_max_bs,
            "--load-format", a.load_format,
            "--tp", a.tp, "--seed", a.seed,
        ]
        if a.tp > 1:
            # Rank 0 hosts the rendezvous; a restarted group meets at the same address.
            engine_flags += ["--dist-init-addr", a.dist_init_addr or f"127.0.0.1:{free_port()}"]
        children = []
        sockets = []
        for rank in range(a.tp):
            port = a.worker_port + rank
            sock = self._socket_dir / f"worker{rank}.sock"
            sockets.append(f"unix:{sock}")
            children.append(Child(
                f"worker rank {rank}",
                self._service("worker", "--model", self.model_path, "--rank", rank, "--port", port,
                              "--unix-socket", sock, *engine_flags),
                f"127.0.0.1:{port}",
                group="workers" if a.tp > 1 else None,
            ))
        scheduler_flags = ["--max-prefill-tokens", a.max_prefill_tokens, "--schedule-policy", a.schedule_policy,
                           "--max-queued-requests", a.max_queued_requests, "--max-prompt-tokens", a.max_prompt_tokens]
        if a.check_kv_invariants:
            scheduler_flags.append("--check-kv-invariants")
        scheduler_flags += ["--overlap-depth", 0 if a.disable_overlap else a.overlap_depth]
        children.append(Child(
            "scheduler",
            self._service("scheduler", "--workers", ",".join(sockets), "--port", a.scheduler_port, *scheduler_flags),
            f"127.0.0.1:{a.scheduler_port}",
        ))
        children.append(Child(
            "tokenizer",
            self._service("tokenizer", "--model", self.model_path, "--host", a.host, "--port", a.port,
                          "--http-port", a.http_port,
                          "--scheduler", f"127.0.0.1:{a.scheduler_port}", *self._public_flags()),
            f"127.0.0.1:{a.port}",
            tls_root=Path(a.tls_cert).read_bytes() if a.tls_cert else None,
            env={"LLMRPC_API_KEY": a.api_key} if a.api_key else None,  # the tokenizer's --api-key default
        ))
        return children

    def _public_flags(self) -> list[object]:
        a = self.args
        flags: list[object] = ["--max-receive-bytes", a.max_receive_bytes]
        if a.tls_cert:
            flags += ["--tls-cert", a.tls_cert, "--tls-key", a.tls_key]
        return flags

    def run(self) -> None:
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            for child in self.children:
                child.start()
            self._wait_until_serving()
            print(f"llmrpc is serving {Path(self.model_path).name}\n"
                  f"  gRPC (llmrpc.v1.Generation): {self.args.host}:{self.args.port}\n"
                  + (f"  OpenAI HTTP:                 http://{self.args.host}:{self.args.http_port}/v1\n"
                     if self.args.http_port else "")
                  + f"  scheduler (tokens in):       127.0.0.1:{self.args.scheduler_port}\n"
                  f"  try: llmrpc generate \"Hello\" --target {self.args.host}:{self.args.port}   (Ctrl-C stops)",
                  flush=True)
            self._supervise()
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            for child in reversed(self.children):
                child.stop()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for child in self.children:
            while not check_health(child.health_target, timeout=1.0, root_certificates=child.tls_root):
                code = child.poll()
                if code is not None:
                    raise SystemExit(f"{child.name} {exit_cause(code)} during start-up")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{child.name} did not report SERVING within {STARTUP_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
            log.info("%s is serving on %s", child.name, child.health_target)

    def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            for child in self.children:
                code = child.poll()
                if code is None or child.process is None:
                    if child.process is None and now >= child.next_start:
                        log.info("restarting %s (restart %d)", child.name, child.restarts)
                        child.start()
                    continue
                # Back off when it keeps dying soon after start; reset after a healthy minute.
                if now - child.started_at > 60:
                    child.restarts = 0
                backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** child.restarts)
                child.restarts += 1
                log.error("%s %s; restarting in %.1f s", child.name, exit_cause(code), backoff)
                child.process = None
                child.next_start = now + backoff
                self._stop_group_of(child)
            time.sleep(0.2)

    def _stop_group_of(self, dead: Child) -> None:
        """Stops the rest of `dead`'s group; all of it restarts together when `dead` does."""
        peers = [c for c in self.children if dead.group is not None and c.group == dead.group and c is not dead]
        if not peers:
            return
        log.error("restarting the %s group with %s", dead.group, dead.name)
        for peer in peers:
            code = peer.poll()
            if code is not None:  # a survivor whose collective failed may have ended already
                log.error("%s %s", peer.name, exit_cause(code))
            peer.stop()  # SIGTERM ends a rank even while it waits in a collective
            peer.process = None
            peer.next_start = dead.next_start
