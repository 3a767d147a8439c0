"""The clients in examples/ and the README's curl commands, run as written against a real stack.

The Node.js example is installed from the npm registry (`npm ci` against the
committed lockfile) the first time, so a clean machine with node and npm runs it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node"
PROMPT = "The capital of France is"


def greedy_text(target: str) -> str:
    """The tokenizer's own greedy completion of PROMPT, the answer every client must print."""
    import grpc

    from llmrpc.v1 import generation_pb2, generation_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        request = generation_pb2.GenerateRequest(
            text=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=8, temperature=0), stream=False)
        (answer,) = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    return answer.text


def run(argv: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_node_example_streams_a_generation(default_stack) -> None:
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm and node, "the Node.js example needs node and npm on PATH"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, timeout=300)
    done = run([node, "generate.js", PROMPT, "--text", "--max-tokens", "8", "--target", default_stack.tokenizer],
               cwd=NODE_DIR)
    assert done.stdout == greedy_text(default_stack.tokenizer)
    assert re.search(r"\[FINISH_REASON_LENGTH\] prompt_tokens=\d+ completion_tokens=8", done.stderr)


def test_python_example_streams_a_generation(default_stack) -> None:
    done = run([sys.executable, "examples/python/generate.py", PROMPT, "--text", "--max-tokens", "8",
                "--target", default_stack.tokenizer])
    assert done.stdout == greedy_text(default_stack.tokenizer)
    assert "[FINISH_REASON_LENGTH]" in done.stderr and "completion_tokens=8" in done.stderr


def test_reflection_only_client_lists_services_and_generates(default_stack) -> None:
    request = json.dumps({"text": PROMPT, "sampling": {"max_tokens": 8, "temperature": 0}})
    # -I: isolated, so llmrpc's compiled stubs cannot be imported even by accident.
    done = run([sys.executable, "-I", "examples/python/reflection_client.py", "--target",
                default_stack.tokenizer, request])
    lines = done.stdout.splitlines()
    services = {line.split()[1] for line in lines if line.startswith("service ")}
    assert {"llmrpc.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    answers = [json.loads(line) for line in lines if line.startswith("{")]
    assert "".join(a.get("text", "") for a in answers) == greedy_text(default_stack.tokenizer)
    assert answers[-1]["finish_reason"] == "FINISH_REASON_LENGTH" and answers[-1]["usage"]["completion_tokens"] == 8


def readme_curl_commands() -> list[str]:
    """The README's curl commands against a local `llmrpc serve` (127.0.0.1:8000), not a cluster's."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip().startswith("curl ") and "127.0.0.1:8000" in line]
    return commands


def test_readme_curl_commands_work_as_written(default_stack) -> None:
    commands = readme_curl_commands()
    assert len(commands) == 4
    host = default_stack.http.removeprefix("http://")
    outputs = []
    for command in commands:
        # Exactly as written, but aimed at this test's port instead of 8000.
        done = run(["bash", "-o", "pipefail", "-c", command.replace("127.0.0.1:8000", host)])
        outputs.append(done.stdout)
    chat, streamed, models, metrics = outputs
    assert json.loads(chat)["choices"][0]["message"]["content"]
    events = [line.removeprefix("data: ") for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert json.loads(models)["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert re.fullmatch(r"llmrpc_scheduler_kv_usage_ratio [0-9.e-]+\n", metrics)
