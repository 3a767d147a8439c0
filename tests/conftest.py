"""Shared fixtures: the default model (fetched once into the user cache) and real stacks.

Service tests start real processes on loopback ports they pick themselves and
stop them all at teardown, whatever happened.

Triton kernels run on CPU tensors here: TRITON_INTERPRET=1 before any kernel is built.
Triton reads the switch when a function is decorated with @triton.jit (triton.language's
own ones included), not when triton is imported, so it is set before any test module
loads; ours are built on first use. CUDA tensors never reach these tests.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

from llmrpc.services.local_stack import LocalStack  # noqa: E402

if TYPE_CHECKING:
    from llmrpc.services.llm import LLM


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, through the project's own fetch and conversion."""
    from llmrpc.engine.default_model import ensure_default_model
    from llmrpc.services.cli import default_cache_dir

    return ensure_default_model(default_cache_dir())


def start_stack(tmp: Path, model: Path | str, *extra: str, tp: int = 1, timeout: float = 300.0) -> LocalStack:
    """`llmrpc serve` on the CPU with the KV invariants checked after every step (LocalStack.start)."""
    return LocalStack.start(tmp, model, "--check-kv-invariants", *extra, tp=tp, timeout=timeout)


def assert_pages_all_back(llm: LLM) -> None:
    """An idle in-process LLM: invariants hold, nothing runs, waits or is in flight, every page is free or cached."""
    core = llm.scheduler
    core.check_invariants()
    assert core.num_running == core.num_waiting == core.num_in_flight == llm.pipeline.num_in_flight == 0
    assert not core.requests
    assert core.num_free_pages + core.num_cached_pages == core.config.num_pages


@pytest.fixture(scope="session")
def default_stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    stack = start_stack(tmp_path_factory.mktemp("stack"), default_model_dir)
    yield stack
    stack.stop()
