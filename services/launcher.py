"""The one launcher: every llmrpc child process, for `llmrpc serve`, the tests and the benches.

`ServiceProcess` is one `llmrpc <command>` process: started (in its own process group when
asked, so it can be stopped with everything it started), waited on until its health port
reports SERVING, stopped by SIGTERM and then SIGKILL. `Launcher` runs a `StackConfig` (the
worker ranks, the scheduler, the tokenizer, each as the typed config its own command builds)
as such processes, each started on the command line `cli.command_line` writes from its config:
it starts them all, waits until each serves, and stops them in reverse order. `llmrpc serve`
also supervises them: a child that dies is restarted (with backoff) and its cause logged; with
`--tp N` the ranks are one group, since survivors are stuck in (or bound to) a process group
with a dead peer, so the whole group is stopped and restarted together. `start_on_fresh_ports`
retries a start whose ports, picked free, were taken before the child bound them.

With `--replicas N` a stack is N replicas (worker ranks and a scheduler each) behind the SMG
gateway (`smg launch`, PyPI `smg`), one more supervised child, ready when its HTTP `/readiness`
answers 200. `GatewayConfig` is its command line, and `find_smg`, `routable`, `wait_routable` and
`wait_model` are the gateway plumbing the benches and tests share.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar, Union

from llmrpc.services.client import check_health
from llmrpc.services.scheduler.server import SchedulerServiceConfig
from llmrpc.services.tokenizer.server import TokenizerConfig
from llmrpc.services.worker.server import WorkerConfig

log = logging.getLogger("llmrpc.serve")

STARTUP_TIMEOUT_S = 600.0
MAX_BACKOFF_S = 30.0
T = TypeVar("T")
ServiceConfig = Union[WorkerConfig, SchedulerServiceConfig, TokenizerConfig]


class StartupError(RuntimeError):
    """A child exited, or never reported SERVING, while starting."""


def exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class ServiceProcess:
    """One `llmrpc <command>` process and the health port that says when it serves."""

    name: str
    argv: list[str]
    target: str  # host:port of its grpc.health.v1 service
    log_path: Path | None = None  # stdout and stderr, appended; None: this process's own
    env: dict[str, str] | None = None  # extra environment (secrets stay out of the process list)
    tls_root: bytes | None = None  # the health probe trusts this certificate (a TLS public port)
    own_group: bool = False  # its own process group: `stop` ends whatever it started too
    group: str | None = None  # the launcher restarts the services of one group together (the TP ranks)
    http: str = ""  # base URL of its HTTP port, where it has one
    health_url: str = ""  # it serves when this answers HTTP 200 (the gateway); else its grpc.health on `target`
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = field(default=0.0)
    _terminated: subprocess.Popen | None = field(default=None, repr=False)  # the process SIGTERM went to

    def start(self) -> ServiceProcess:
        env = {**os.environ, **self.env} if self.env else None
        if self.log_path is None:
            self.process = subprocess.Popen(self.argv, env=env, start_new_session=self.own_group)
        else:
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=self.own_group)
        self.started_at = time.monotonic()
        return self

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def serving(self) -> bool:
        if self.health_url:
            try:
                with urllib.request.urlopen(self.health_url, timeout=1.0) as answer:
                    return bool(answer.status == 200)
            except OSError:  # refused, or an HTTP error status (503: no healthy worker yet)
                return False
        return check_health(self.target, timeout=1.0, root_certificates=self.tls_root)

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Returns once it reports SERVING; raises StartupError when it exits or `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while not self.serving():
            code = self.poll()
            if code is not None:
                raise StartupError(f"{self.name} {exit_cause(code)} during start-up{self._log_tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"{self.name} did not report SERVING within {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> None:
        """SIGTERM, once, if it runs (not SIGINT: a parent started in the background may pass SIGINT down ignored)."""
        if self.process is not None and self.process.poll() is None and self._terminated is not self.process:
            self._terminated = self.process
            self.process.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; in its own process group, what is left of the group too."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.own_group:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return "" if self.log_path is None else self.log_path.read_text(errors="replace")

    def _log_tail(self) -> str:
        return f":\n{self.log()[-4000:]}" if self.log_path is not None else ""


# ---- the SMG gateway ---------------------------------------------------------------------------

SMG_VERSION = "1.13.0"  # pinned in pyproject's test extra
SMG_INSTALL = f"pip install smg=={SMG_VERSION}"


def find_smg(path: str | None = None) -> str | None:
    """The `smg` command: on PATH (or `path`), else beside this interpreter (a venv not activated)."""
    return shutil.which("smg", path=path) or shutil.which("smg", path=str(Path(sys.executable).parent))


@dataclass(frozen=True)
class GatewayConfig:
    """`smg launch` over schedulers' SMG contract (grpc://HOST:PORT each), its tokenizer from `model_path`.

    Health probes run every second, so a dead replica leaves the rotation and a returned one rejoins
    within seconds; the metrics port is on loopback (SMG's default is 0.0.0.0:29000).
    """

    command: str  # the smg executable
    schedulers: tuple[str, ...]
    model_path: str
    port: int
    metrics_port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"
    log_level: str = "warn"  # SMG's names: debug, info, warn, error
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [self.command, "launch", "--host", self.host, "--port", str(self.port),
                "--worker-urls", *(f"grpc://{s}" for s in self.schedulers), "--policy", self.policy,
                "--model-path", self.model_path,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
                "--health-check-interval-secs", "1", "--health-success-threshold", "1",
                # It registers the workers at start: retry each second (SMG's default is every 30 s),
                # since `serve` starts it beside replicas still loading the model.
                "--worker-startup-check-interval", "1",
                "--shutdown-grace-period-secs", "1", "--log-level", self.log_level, *self.extra]

    def process(self, name: str = "gateway", log_path: Path | None = None, own_group: bool = False) -> ServiceProcess:
        """The gateway as a child: it serves once `/readiness` says a worker is healthy."""
        http = f"http://127.0.0.1:{self.port}"
        return ServiceProcess(name, self.argv(), f"127.0.0.1:{self.port}", log_path=log_path, http=http,
                              health_url=f"{http}/readiness", own_group=own_group)


def gateway(log_dir: Path, model: Path | str, schedulers: list[str], policy: str = "cache_aware",
            *extra: str) -> ServiceProcess:
    """SMG over `schedulers` on free loopback ports, in its own process group, logging under `log_dir`
    (the benches' and tests' gateway; `llmrpc serve --replicas` plans its own on its flags' ports)."""
    from llmrpc.services.rpc import free_port

    command = find_smg()
    if command is None:
        raise SystemExit(f"the smg gateway is missing: {SMG_INSTALL} (or llmrpc's test extra)")
    config = GatewayConfig(command, tuple(schedulers), str(model), port=free_port(), metrics_port=free_port(),
                           policy=policy, extra=extra)
    return config.process("smg", Path(log_dir) / f"smg-{config.port}.log", own_group=True)


def routable(gateway: ServiceProcess) -> dict[str, bool]:
    """Each worker URL the gateway knows, and whether it routes to it now."""
    with urllib.request.urlopen(f"{gateway.http}/workers", timeout=5) as answer:
        return {w["url"]: w["is_healthy"] and w["status"] == "ready" for w in json.load(answer)["workers"]}


def wait_routable(gateway: ServiceProcess, schedulers: list[str], timeout: float = 60.0) -> None:
    urls = [f"grpc://{s}" for s in schedulers]
    deadline = time.monotonic() + timeout
    while True:
        try:
            workers = routable(gateway)
        except OSError:
            workers = {}
        if all(workers.get(url) for url in urls):
            return
        if gateway.poll() is not None:
            raise RuntimeError(f"smg exited:\n{gateway.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"smg does not route to {urls} after {timeout} s: {workers}\n{gateway.log()[-3000:]}")
        time.sleep(0.2)


def wait_model(gateway: ServiceProcess, timeout: float = 60.0) -> str:
    """The model id, once the gateway answers a completion for it (it loads its tokenizer in the background)."""
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(f"{gateway.http}/v1/models", timeout=5) as answer:
        model: str = json.load(answer)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
    while True:
        request = urllib.request.Request(f"{gateway.http}/v1/completions", body, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10):
                return model
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# ---- a stack ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedService:
    """One child of a stack: its name in logs, the `llmrpc` command (or "smg"), the config it runs."""

    name: str
    command: str
    config: ServiceConfig | GatewayConfig
    group: str | None = None


@dataclass(frozen=True)
class ReplicaConfig:
    """One model replica: its worker ranks (one TP group) and the scheduler in front of them."""

    workers: tuple[WorkerConfig, ...]
    scheduler: SchedulerServiceConfig


@dataclass(frozen=True)
class StackConfig:
    """What a launcher runs: each child's config, exactly as that child's own command builds it."""

    replicas: tuple[ReplicaConfig, ...]
    tokenizer: TokenizerConfig | None = None  # None: no front door (benches speak tokens to the scheduler)
    gateway: GatewayConfig | None = None  # SMG in front of the replicas' schedulers (`--replicas` > 1)
    log_level: str = "info"
    trace: bool = False  # every child prints services/trace.py's points (`--trace`)

    @property
    def workers(self) -> tuple[WorkerConfig, ...]:
        return self.replicas[0].workers

    @property
    def scheduler(self) -> SchedulerServiceConfig:
        return self.replicas[0].scheduler

    def with_scheduler(self, scheduler: SchedulerServiceConfig) -> StackConfig:
        """This stack with replica 0's scheduler replaced (the benches' one-replica stacks)."""
        first = dataclasses.replace(self.replicas[0], scheduler=scheduler)
        return dataclasses.replace(self, replicas=(first, *self.replicas[1:]))

    def services(self) -> list[PlannedService]:
        """Start order: each replica's worker ranks and scheduler, then the tokenizer or the gateway.

        With one replica the names are "worker rank K" and "scheduler"; with several, "replica R ..." each.
        """
        planned = []
        for r, replica in enumerate(self.replicas):
            prefix = f"replica {r} " if len(self.replicas) > 1 else ""
            group = f"{prefix}workers" if len(replica.workers) > 1 else None
            planned += [PlannedService(f"{prefix}worker rank {w.engine.tp_rank}", "worker", w, group)
                        for w in replica.workers]
            planned.append(PlannedService(f"{prefix}scheduler", "scheduler", replica.scheduler))
        if self.tokenizer is not None:
            planned.append(PlannedService("tokenizer", "tokenizer", self.tokenizer))
        if self.gateway is not None:
            planned.append(PlannedService("gateway", "smg", self.gateway))
        return planned


class Launcher:
    """A StackConfig's services as child processes: started, waited on, supervised, stopped.

    With `log_dir`, each child logs to `<log_dir>/<name>.log`; without, to this process's output.
    """

    def __init__(self, config: StackConfig, log_dir: Path | None = None) -> None:
        self.config = config
        self.log_dir = log_dir
        self.children = [self._process(s) for s in config.services()]

    def _process(self, service: PlannedService) -> ServiceProcess:
        from llmrpc.services.cli import command_line

        log_path = None if self.log_dir is None else self.log_dir / f"{service.name.replace(' ', '-')}.log"
        if isinstance(service.config, GatewayConfig):
            return service.config.process(service.name, log_path)
        argv, env = command_line(service.command, service.config, self.config.log_level, self.config.trace)
        security = service.config.security
        return ServiceProcess(
            service.name, argv, f"127.0.0.1:{service.config.port}", log_path=log_path,
            env=env or None,
            # Only the public port can have TLS here; the internal links are local sockets.
            tls_root=Path(security.tls_cert).read_bytes() if security.tls_cert else None,
            group=service.group)

    def child(self, name: str) -> ServiceProcess:
        return next(c for c in self.children if c.name == name)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> Launcher:
        """Starts every child, then waits until each serves; on any failure stops them all and raises."""
        try:
            for child in self.children:
                child.start()
            for child in self.children:
                child.wait_serving(timeout)
                log.info("%s is serving on %s", child.name, child.target)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Every child told to stop at once (front door first), then each waited for: one slow child's 5 s
        before SIGKILL is not added to the next one's."""
        for child in reversed(self.children):
            child.terminate()
        for child in reversed(self.children):
            child.stop(timeout=5.0)

    def replace_scheduler(self, scheduler: SchedulerServiceConfig, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Stops the scheduler and starts one on `scheduler`; the workers stay and take its step stream."""
        self.config = self.config.with_scheduler(scheduler)
        index = next(i for i, c in enumerate(self.children) if c.name == "scheduler")
        self.children[index].stop()
        self.children[index] = self._process(next(s for s in self.config.services() if s.name == "scheduler"))
        self.children[index].start().wait_serving(timeout)

    def run(self) -> None:
        """`llmrpc serve`: start, say where it serves, supervise until Ctrl-C or SIGTERM, stop."""
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.start()
            self._announce()
            self._supervise()
        except KeyboardInterrupt:
            log.info("stopping")
        except StartupError as exc:
            raise SystemExit(str(exc)) from None
        finally:
            self.stop()

    def _announce(self) -> None:
        if self.config.gateway is not None:
            gateway = self.config.gateway
            print(f"llmrpc is serving {Path(gateway.model_path).name} as {len(self.config.replicas)} replicas "
                  f"behind the SMG gateway ({gateway.policy})\n"
                  f"  OpenAI HTTP (SMG):           http://{gateway.host}:{gateway.port}/v1\n"
                  f"  replicas' schedulers:        {', '.join(gateway.schedulers)}\n"
                  f"  SMG metrics:                 http://127.0.0.1:{gateway.metrics_port}/metrics\n"
                  "  llmrpc's gRPC front (--port) is not started: SMG is the one front door   (Ctrl-C stops)",
                  flush=True)
            return
        tokenizer, scheduler = self.config.tokenizer, self.config.scheduler
        assert tokenizer is not None  # serve always runs a front door
        public = f"{tokenizer.host}:{tokenizer.port}"
        print(f"llmrpc is serving {Path(tokenizer.model_path).name}\n"
              f"  gRPC (llmrpc.v1.Generation): {public}\n"
              + (f"  OpenAI HTTP:                 http://{tokenizer.host}:{tokenizer.http_port}/v1\n"
                 if tokenizer.http_port else "")
              + f"  scheduler (tokens in):       127.0.0.1:{scheduler.port}\n"
              f"  try: llmrpc generate \"Hello\" --target {public}   (Ctrl-C stops)",
              flush=True)

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

    def _stop_group_of(self, dead: ServiceProcess) -> None:
        """Stops the rest of `dead`'s group; all of it restarts together when `dead` does."""
        peers = [c for c in self.children if dead.group is not None and c.group == dead.group and c is not dead]
        if not peers:
            return
        log.error("restarting the %s group with %s", dead.group, dead.name)
        for peer in peers:
            code = peer.poll()
            if code is not None:  # a survivor whose collective failed may have ended already
                log.error("%s %s", peer.name, exit_cause(code))
            peer.stop(timeout=5.0)  # SIGTERM ends a rank even while it waits in a collective
            peer.process = None
            peer.next_start = dead.next_start


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the same way Ctrl-C does


def start_on_fresh_ports(start: Callable[[], T], attempts: int = 3) -> T:
    """`start()`, which picks new free ports each call, again when it raises StartupError:
    a port picked free can be taken by another process before the child binds it."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except StartupError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
