"""The compose topology, proven without a Docker engine.

Each service of the `cpu` profile runs as a local process with exactly its
compose command and environment (ports remapped to free loopback ports, service
names to 127.0.0.1, the model volume to the local cache), in depends_on order,
waiting on each health check; then a generation streams through the front door.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmrpc.services.cli import build_parser, default_cache_dir
from llmrpc.services.rpc import channel, free_port
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc


ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LLMRPC = [sys.executable, "-m", "llmrpc.services.cli"]
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: object) -> object:
    """Compose's ${VAR:-default}, with an empty environment (the defaults apply)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def load_services(profile: str) -> dict[str, dict]:
    services = _interpolate(yaml.safe_load(COMPOSE.read_text())["services"])
    return {name: s for name, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


def start_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in services[name].get("depends_on", {}):
            if dep in services:
                visit(dep)
        order.append(name)

    for name in services:
        visit(name)
    return order


class LocalCompose:
    """Runs compose services as local processes on remapped loopback ports."""

    def __init__(self, services: dict[str, dict], models_dir: Path) -> None:
        self.services = services
        self.models_dir = models_dir
        self.ports: dict[tuple[str, int], int] = {}  # (service name or alias, container port) -> local port
        self.processes: list[subprocess.Popen] = []
        for name, service in services.items():
            aliases = [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]
            command = service.get("command", [])
            if "--port" in command:
                container_port = int(command[command.index("--port") + 1])
                local = free_port()
                for alias in aliases:
                    self.ports[(alias, container_port)] = local

    def rewrite(self, args: list[str], own: str | None = None) -> list[str]:
        out = []
        for i, arg in enumerate(args):
            if arg == "0.0.0.0":
                arg = "127.0.0.1"  # tests never listen beyond loopback
            elif i > 0 and args[i - 1] == "--port" and own is not None:
                arg = str(self.ports[(own, int(arg))])
            else:
                arg = re.sub(r"\b([\w-]+):(\d+)\b",
                             lambda m: f"127.0.0.1:{self.ports[(m.group(1), int(m.group(2)))]}"
                             if (m.group(1), int(m.group(2))) in self.ports else m.group(0), arg)
            out.append(arg)
        return out

    def environment(self, service: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRPC_")}
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            env[key] = str(self.models_dir) if value == "/models" else value
        return env

    def health_ok(self, name: str) -> bool:
        check = self.services[name]["healthcheck"]["test"]
        assert check[:2] == ["CMD", "llmrpc"]
        local_check = [*check[2:]]
        local_check = [f"127.0.0.1:{self.ports[(name, int(a.split(':')[1]))]}" if a.startswith("127.0.0.1:") else a
                       for a in local_check]
        return subprocess.run([*LLMRPC, *local_check], capture_output=True, timeout=30).returncode == 0

    def up(self, log_dir: Path, timeout: float = 300.0) -> None:
        for name in start_order(self.services):
            service = self.services[name]
            argv = [*LLMRPC, *self.rewrite(service["command"], own=name)]
            log = open(log_dir / f"{name}.log", "wb")
            if service.get("restart") == "no":  # one-shot: must finish successfully first
                result = subprocess.run(argv, env=self.environment(service), stdout=log, stderr=subprocess.STDOUT,
                                        timeout=timeout)
                assert result.returncode == 0, (log_dir / f"{name}.log").read_text()
                continue
            self.processes.append(subprocess.Popen(argv, env=self.environment(service), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + timeout
            while not self.health_ok(name):
                assert self.processes[-1].poll() is None, (log_dir / f"{name}.log").read_text()
                assert time.monotonic() < deadline, f"{name} never became healthy"
                time.sleep(0.5)

    def down(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_cpu_profile_serves_a_generation(tmp_path: Path, default_model_dir: Path) -> None:
    services = load_services("cpu")
    assert set(services) == {"model-init", "worker-cpu", "scheduler", "tokenizer"}
    assert start_order(services).index("tokenizer") > start_order(services).index("scheduler")
    compose = LocalCompose(services, default_cache_dir())
    try:
        compose.up(tmp_path)
        target = f"127.0.0.1:{compose.ports[('tokenizer', 50051)]}"

        async def generate() -> list[pb.GenerateResponse]:
            async with channel(target) as ch:
                stub = generation_pb2_grpc.GenerationStub(ch)
                request = pb.GenerateRequest(text="The capital of France is",
                                             sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))
                return [r async for r in stub.Generate(request, timeout=60)]

        responses = asyncio.run(generate())
        assert "".join(r.text for r in responses).strip()
        assert responses[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert responses[-1].usage.completion_tokens == sum(len(r.token_ids) for r in responses)
    finally:
        compose.down()


def test_gpu_profile_is_the_default_and_reserves_a_gpu() -> None:
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env").read_text().splitlines()
    services = load_services("gpu")
    assert set(services) == {"model-init", "worker", "scheduler", "tokenizer"}
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["ipc"] == "host"
    for name in ("worker", "scheduler", "tokenizer"):
        assert services[name]["restart"] == "unless-stopped"


def _dockerfile_commands() -> list[list[str]]:
    import json

    return [json.loads(line.split(None, 1)[1]) for line in DOCKERFILE.read_text().splitlines()
            if line.startswith("CMD ")]


@pytest.mark.parametrize("argv", _dockerfile_commands()
                         + [s["command"] for s in _interpolate(yaml.safe_load(COMPOSE.read_text())["services"]).values()])
def test_every_image_command_is_a_cli_command(argv: list[str]) -> None:
    build_parser().parse_args(argv)  # the exact arguments parse
    assert subprocess.run([*LLMRPC, argv[0], "--help"], capture_output=True, timeout=60).returncode == 0
