"""The compose topology, proven without a Docker engine.

`docker compose config` needs the compose plugin, which this machine's docker client lacks,
so the file's semantics are checked here as compose resolves them: which services each
profile runs, that every dependency exists and is one compose can wait for, that one-shot
model-init runs before anything reads the model, that published ports do not collide.
Then the `cpu` and `gateway` profiles run as local processes (tests/docker/topology.py) with
exactly their commands and environments, in depends_on order, each waited on by its own
health check; a generation streams through the front door, and through SMG.
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
import yaml

from llmrpc.services.cli import default_cache_dir
from llmrpc.services.rpc import channel
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.docker.topology import (PROGRAMS, ROOT, Ports, Processes, check_command, complete, dockerfile_stages,
                                   entrypoint, gateway_workers, local_env)

COMPOSE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _interpolate(value: object) -> object:
    """Compose's ${VAR:-default}, with an empty environment (the defaults apply)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def all_services() -> dict[str, dict]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text())["services"])


def load_services(*profiles: str) -> dict[str, dict]:
    """The services `docker compose --profile P...` runs: those without profiles and those in one of P."""
    return {name: s for name, s in all_services().items()
            if not s.get("profiles") or set(s["profiles"]) & set(profiles)}


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


def container_path(volume: str) -> str:
    """`NAME:/path[:mode]` -> /path."""
    return volume.split(":")[1]


class LocalCompose:
    """Runs compose services as local processes on remapped loopback ports."""

    def __init__(self, services: dict[str, dict], models_dir: Path, log_dir: Path) -> None:
        self.services = services
        self.paths = {"/models": models_dir}
        self.ports = Ports()
        self.processes = Processes(log_dir)
        for name, service in services.items():
            aliases = [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]
            command = service.get("command", [])
            for flag, value in zip(command, command[1:]):
                if flag.endswith("-port"):  # --port, --http-port, --prometheus-port
                    self.ports.expose(aliases, int(value))

    def argv(self, name: str, program: str, args: list[str]) -> list[str]:
        return [*PROGRAMS[program], *self.ports.rewrite(args, name, self.paths)]

    def health_ok(self, name: str) -> bool:
        check = self.services[name]["healthcheck"]["test"]
        assert check[0] == "CMD"
        argv = self.argv(name, check[1], check[2:])
        return self.processes.run_quietly(argv) == 0

    def up(self, timeout: float = 300.0) -> None:
        for name in start_order(self.services):
            service = self.services[name]
            argv = self.argv(name, entrypoint(service["image"])[0], service["command"])
            env = local_env(service.get("environment") or {}, self.paths)
            if service.get("restart") == "no":  # one-shot: must finish successfully first
                self.processes.run_once(name, argv, env, timeout)
                continue
            self.processes.start(name, argv, env)
            self.processes.wait_until(name, lambda: self.health_ok(name), timeout)

    def down(self) -> None:
        self.processes.down()


def test_profiles_resolve_as_compose_does() -> None:
    """Each profile of the README runs a complete stack compose can start and wait on."""
    defined = all_services()
    expected = {
        ("gpu",): {"model-init", "worker", "scheduler", "tokenizer"},
        ("cpu",): {"model-init", "worker-cpu", "scheduler", "tokenizer"},
        ("gateway",): {"model-init", "replica1-worker", "replica1-scheduler", "replica2-worker",
                       "replica2-scheduler", "gateway"},
    }
    for profiles, names in expected.items():
        services = load_services(*profiles)
        assert set(services) == names, profiles
        published: list[str] = []
        for name, service in services.items():
            for dep, rule in service.get("depends_on", {}).items():
                assert dep in defined, f"{name} depends on undefined {dep}"
                assert rule["condition"] in CONDITIONS
                # compose refuses to start a service whose required dependency is not in the run
                assert dep in services or rule.get("required") is False, f"{profiles}: {name} needs {dep}"
                if rule["condition"] == "service_healthy":
                    assert "healthcheck" in defined[dep], f"{name} waits on {dep}'s health, which has none"
                if rule["condition"] == "service_completed_successfully":
                    assert defined[dep]["restart"] == "no"
            if name != "model-init":
                assert service["restart"] == "unless-stopped" and service["healthcheck"]["test"][0] == "CMD"
            if any(container_path(v) == "/models" for v in service.get("volumes", [])) and name != "model-init":
                assert _waits_for(services, name, "model-init"), f"{name} may read the model before it exists"
            published += [p.rsplit(":", 1)[0] for p in service.get("ports", [])]
        assert len(published) == len(set(published)), f"{profiles}: a host port is published twice"
    # model-init belongs to no profile: every run fetches the model first, once.
    assert "profiles" not in defined["model-init"] and defined["model-init"]["command"] == ["download"]
    assert defined["tokenizer"]["ports"] == ["50051:50051", "8000:8000"]
    assert defined["gateway"]["ports"] == ["30000:30000"]


def _waits_for(services: dict[str, dict], name: str, target: str) -> bool:
    deps = services[name].get("depends_on", {})
    return target in deps or any(_waits_for(services, dep, target) for dep in deps if dep in services)


def test_cpu_profile_serves_a_generation(tmp_path: Path, default_model_dir: Path) -> None:
    services = load_services("cpu")
    assert set(services) == {"model-init", "worker-cpu", "scheduler", "tokenizer"}
    assert start_order(services).index("tokenizer") > start_order(services).index("scheduler")
    compose = LocalCompose(services, default_cache_dir(), tmp_path)
    try:
        compose.up()
        target = f"127.0.0.1:{compose.ports.local('tokenizer', 50051)}"

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
        # The OpenAI port the tokenizer publishes beside gRPC answers the same greedy prompt.
        http = f"http://127.0.0.1:{compose.ports.local('tokenizer', 8000)}"
        assert complete(http, "The capital of France is", max_tokens=8)["text"] == "".join(r.text for r in responses)
    finally:
        compose.down()


def test_gateway_profile_serves_through_smg(tmp_path: Path, default_model_dir: Path) -> None:
    """Two replicas behind SMG (its gRPC workers are the replicas' schedulers): both registered, and a
    completion is answered through it."""
    services = load_services("gateway")
    compose = LocalCompose(services, default_cache_dir(), tmp_path)
    try:
        compose.up()
        gateway = f"http://127.0.0.1:{compose.ports.local('gateway', 30000)}"
        schedulers = {f"127.0.0.1:{compose.ports.local(f'replica{i}-scheduler', 50052)}" for i in (1, 2)}
        # SMG answers its health check before it has registered every worker it was started with (a
        # clean-clone CI run saw one of two): wait for its registration, then compare exactly.
        deadline = time.monotonic() + 30
        while gateway_workers(gateway) != schedulers and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gateway_workers(gateway) == schedulers
        answer = complete(gateway, "The capital of France is", max_tokens=8)
        assert answer["text"].strip() and answer["finish_reason"] in ("length", "stop")
        assert 0 < answer["usage"]["completion_tokens"] <= 8
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


def _image_commands() -> list[tuple[str, list[str]]]:
    """(program, arguments) of every Dockerfile CMD and compose command."""
    stages = dockerfile_stages()
    commands = [(stage["ENTRYPOINT"][0], stage["CMD"]) for stage in stages.values()]
    commands += [(entrypoint(s["image"])[0], s["command"]) for s in all_services().values()]
    return commands


@pytest.mark.parametrize("program,argv", _image_commands())
def test_every_image_command_is_a_cli_command(program: str, argv: list[str]) -> None:
    check_command(program, argv)
