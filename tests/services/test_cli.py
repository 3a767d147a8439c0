"""The `llmrpc` command as a user runs it: subprocesses of the installed entry point against a real stack."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmrpc.services.client import generate_text


LLMRPC = Path(sys.executable).with_name("llmrpc")  # the console script pyproject installs beside python


def llmrpc(*argv: str, stdin: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    assert LLMRPC.exists(), f"{LLMRPC} is missing: pip install -e . installs the llmrpc command"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRPC_")}  # flags only, no ambient config
    return subprocess.run([str(LLMRPC), *argv], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def dead_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def greedy(target: str, prompt: str, max_tokens: int) -> str:
    return "".join([p async for p in generate_text(target, prompt, max_tokens=max_tokens, temperature=0.0)])


def test_generate_prints_the_greedy_completion(default_stack) -> None:
    prompt = "Name a large city in Japan."
    done = llmrpc("generate", prompt, "--target", default_stack.tokenizer, "--temperature", "0", "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    want = asyncio.run(greedy(default_stack.tokenizer, prompt, 16))
    assert want and done.stdout == want + "\n"


def test_chat_reads_turns_from_stdin_and_exits(default_stack) -> None:
    done = llmrpc("chat", "--target", default_stack.tokenizer, "--temperature", "0", "--max-tokens", "8",
                  stdin="hello\n/reset\n/exit\n")
    assert done.returncode == 0, done.stderr
    reply = asyncio.run(greedy(default_stack.tokenizer, "hello", 8))
    assert reply
    assert done.stdout == ("chat with the model: /reset clears the conversation, /exit or Ctrl-D quits\n"
                           f"> {reply}\n> (conversation cleared)\n> ")


def test_health_exit_code_follows_serving(default_stack) -> None:
    serving = llmrpc("health", default_stack.tokenizer)
    assert (serving.returncode, serving.stdout) == (0, "SERVING\n")
    dead = llmrpc("health", dead_port(), "--timeout", "1")
    assert (dead.returncode, dead.stdout) == (1, "NOT_SERVING\n")


@pytest.mark.parametrize("command,flag", [("worker", "--rank"), ("scheduler", "--workers"), ("tokenizer", "--scheduler")])
def test_service_commands_have_help(command: str, flag: str) -> None:
    done = llmrpc(command, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: llmrpc {command}")
    assert flag in done.stdout


def test_a_negative_overlap_depth_is_refused_naming_the_flag() -> None:
    done = llmrpc("scheduler", "--workers", dead_port(), "--overlap-depth", "-1", timeout=60)
    assert done.returncode == 2 and "--overlap-depth: must be >= 0, got -1" in done.stderr, done.stderr


def test_a_negative_overlap_depth_from_the_environment_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRPC_")} | {"LLMRPC_OVERLAP_DEPTH": "-2"}
    done = subprocess.run([str(LLMRPC), "scheduler", "--workers", dead_port()], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 1 and "overlap_depth must be >= 0, got -2" in done.stderr, done.stderr
