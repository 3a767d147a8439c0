"""docker/Dockerfile's images agree with what the project declares and tests.

The gpu-worker image installs exactly docker/requirements-gpu.txt: it must pin every
dependency of pyproject.toml at a version its specifier admits, and a CUDA whose nvcc is the
CUDA of the pinned torch (FlashInfer builds its kernels with it). The gateway image runs the
SMG version the tests run.
"""
from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

from tests.docker.topology import DOCKERFILE, ROOT

LOCK = ROOT / "docker" / "requirements-gpu.txt"
LEFT_OUT = ("nvidia-cutlass-dsl", "nvidia-cudnn-frontend")  # flashinfer extras llmrpc never imports
IMAGE_PYTHON = {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = version
    return pins


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    return value


def test_gpu_lock_pins_every_dependency_at_an_admitted_version() -> None:
    pins = lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(IMAGE_PYTHON):
            assert _normal(requirement.name) in pins, f"{requirement.name} is not pinned: bash docker/lock-gpu.sh"
            assert requirement.specifier.contains(pins[_normal(requirement.name)]), text
    assert pins["torch"] == "2.11.0" and pins["flashinfer-python"] == "0.5.3"
    assert not [name for name in pins if name.startswith(LEFT_OUT)]
    assert "RUN pip install --no-deps -r /tmp/requirements-gpu.txt" in DOCKERFILE.read_text()


def test_gpu_image_has_the_nvcc_of_its_torch() -> None:
    image = dockerfile_arg("CUDA_IMAGE")
    assert image.startswith("nvidia/cuda:") and "-devel-" in image  # devel: nvcc for FlashInfer's JIT
    cuda = ".".join(image.split(":")[1].split(".")[:2])
    # torch's PyPI build names its CUDA through the cuda-toolkit it requires.
    assert ".".join(lock()["cuda-toolkit"].split(".")[:2]) == cuda


def test_gateway_image_runs_the_smg_the_tests_run() -> None:
    assert dockerfile_arg("SMG_VERSION") == metadata.version("smg")


def test_image_check_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "image_check.sh")]).returncode == 0
