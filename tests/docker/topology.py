"""Container topologies (compose services, Kubernetes pods) run as local processes, with no engine.

A container becomes a process running exactly its command: the image's ENTRYPOINT (read
from docker/Dockerfile) as the same program here, its arguments and environment with the
container ports remapped to free loopback ports and the volume paths to local folders.
test_compose.py and test_k8s.py build their topologies from the files they check with these.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from llmrpc.services.cli import build_parser
from llmrpc.services.rpc import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent
# What each program an image runs is, on this machine.
PROGRAMS = {
    "llmrpc": [sys.executable, "-m", "llmrpc.services.cli"],
    "llmrpc-worker-group": ["bash", str(ROOT / "docker" / "worker-group.sh")],
    "smg": [str(BIN / "smg")],
    "python": [sys.executable],
}
_HOST_PORT = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d+)\b")
_LOOPBACK = ("127.0.0.1", "localhost", "0.0.0.0")


def dockerfile_stages() -> dict[str, dict[str, list[str]]]:
    """Each docker/Dockerfile target's ENTRYPOINT and CMD (exec form)."""
    stages: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], {})
        elif line.startswith(("ENTRYPOINT ", "CMD ")):
            key, value = line.split(None, 1)
            current[key] = json.loads(value)
    return stages


def entrypoint(image: str) -> list[str]:
    """The ENTRYPOINT of `llmrpc:<target>`, the images docker/Dockerfile builds."""
    name, target = image.split(":")
    assert name == "llmrpc", f"{image} is not built by docker/Dockerfile"
    return dockerfile_stages()[target]["ENTRYPOINT"]


def check_command(program: str, args: list[str]) -> None:
    """The arguments are a real command of `program`: its own parser accepts every one."""
    if program == "llmrpc":
        build_parser().parse_args(args)
        assert subprocess.run([*PROGRAMS[program], args[0], "--help"], capture_output=True,
                              timeout=60).returncode == 0
    elif program == "llmrpc-worker-group":  # RANKS BASE_PORT SOCKET_DIR, then each rank's flags
        ranks, port, sockets, *flags = args
        assert int(ranks) >= 1 and int(port) > 0 and sockets.startswith("/")
        build_parser().parse_args(["worker", "--rank", "0", "--tp", ranks, "--port", port,
                                   "--unix-socket", f"{sockets}/worker-0.sock", *flags])
    elif program == "smg":
        from smg.launch_router import parse_router_args

        assert args[0] == "launch"
        parse_router_args(args[1:])._validate_router_args()
    else:
        raise AssertionError(f"no check for {program}")


class Ports:
    """Container ports of each scope (a compose service, a pod) on free loopback ports."""

    def __init__(self) -> None:
        self._local: dict[tuple[str, int], int] = {}

    def expose(self, scopes: Iterable[str], port: int) -> int:
        """`port` of a container reachable as each of `scopes` (a name and its aliases)."""
        local = free_port()
        for scope in scopes:
            self._local[(scope, port)] = local
        return local

    def local(self, scope: str, port: int) -> int:
        return self._local[(scope, port)]

    def rewrite(self, args: list[str], scope: str, paths: dict[str, Path]) -> list[str]:
        """`args` of a container in `scope`: its ports, its peers' HOST:PORT and volume paths made local.

        A port is a value after a `--...port` flag or an argument equal to a port the scope
        exposes; loopback and 0.0.0.0 mean the scope itself (tests listen on loopback only).
        """
        exposed = {port for (s, port) in self._local if s == scope}
        out = []
        for i, arg in enumerate(args):
            if arg in _LOOPBACK:
                arg = "127.0.0.1"
            elif arg.isdigit() and (int(arg) in exposed or (i > 0 and args[i - 1].endswith("port"))):
                arg = str(self.local(scope, int(arg)))
            else:
                arg = _HOST_PORT.sub(lambda m: self._host_port(m, scope), arg)
                arg = local_paths(arg, paths)
            out.append(arg)
        return out

    def _host_port(self, match: re.Match, scope: str) -> str:
        host, port = match.group(1), int(match.group(2))
        peer = scope if host in _LOOPBACK else host
        return f"127.0.0.1:{self._local[(peer, port)]}" if (peer, port) in self._local else match.group(0)


def local_paths(value: str, paths: dict[str, Path]) -> str:
    """Container paths (mount points) in `value` replaced by the local folders standing in for them."""
    for mount, local in sorted(paths.items(), key=lambda item: -len(item[0])):
        value = re.sub(rf"(?<![\w/]){re.escape(mount)}(?=/|,|$)", str(local), value)
    return value


def local_env(values: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    """A container's environment here: this one's without LLMRPC_* (only the container's count), and
    this interpreter's bin first on PATH (the programs a container's scripts call)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRPC_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({key: local_paths(str(value), paths) for key, value in values.items()})
    return env


class Processes:
    """The topology's processes, each in its own session, logging to a file; `down` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def run_once(self, name: str, argv: list[str], env: dict[str, str], timeout: float = 300.0) -> None:
        """A one-shot container (compose `restart: no`, an init container): must exit 0."""
        with open(self.log_dir / f"{name}.log", "wb") as log:
            result = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        assert result.returncode == 0, self.log(name)

    @staticmethod
    def run_quietly(argv: list[str], timeout: float = 30.0) -> int:
        """A health check's exit status."""
        return subprocess.run(argv, capture_output=True, timeout=timeout).returncode

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.running[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)

    def wait_until(self, name: str, ok: Callable[[], bool], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            assert self.running[name].poll() is None, f"{name} exited:\n{self.log(name)[-4000:]}"
            assert time.monotonic() < deadline, f"{name} never became healthy:\n{self.log(name)[-4000:]}"
            time.sleep(0.5)

    def down(self) -> None:
        """SIGTERM to each process group (a worker group's ranks too), newest first; SIGKILL what stays."""
        for process in reversed(self.running.values()):
            _signal_group(process, signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the whole group has ended
        pass


# ---- what the tests ask a running topology over HTTP -------------------------------------


def http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def complete(base_url: str, prompt: str, max_tokens: int = 8) -> dict:
    """A greedy OpenAI completion from `base_url` (its first model): the response's only choice and usage."""
    model = http_json(f"{base_url}/v1/models")["data"][0]["id"]
    answer = http_json(f"{base_url}/v1/completions",
                       {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    (choice,) = answer["choices"]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "usage": answer["usage"]}


def gateway_workers(base_url: str) -> set[str]:
    """HOST:PORT of each worker the SMG gateway at `base_url` has registered."""
    return {w["url"].split("://", 1)[1] for w in http_json(f"{base_url}/workers")["workers"]}
