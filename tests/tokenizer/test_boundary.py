"""The front door stands alone: no tokenizer module loads the scheduler service, the engine (but engine/hub.py,
which finds model files and reads tokenizers) or the worker, nor torch.

What both services share lives in services/contract.py, services/status.py and
services/messages.py; this checks, in a fresh interpreter, that importing every tokenizer
module (HTTP front door included) loads nothing from the services behind it.
"""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import llmrpc.services.tokenizer as tokenizer_package

FORBIDDEN = ("llmrpc.services.scheduler", "llmrpc.services.worker", "llmrpc.engine")
# Where a model's files are found and its tokenizer read, for the worker (constraints) and the tokenizer
# alike: no torch, no engine past it (checked below).
SHARED = {"llmrpc.engine", "llmrpc.engine.hub"}


def test_tokenizer_modules_import_nothing_from_the_scheduler() -> None:
    modules = [f"llmrpc.services.tokenizer.{m.name}" for m in pkgutil.iter_modules(tokenizer_package.__path__)]
    assert {"llmrpc.services.tokenizer.server", "llmrpc.services.tokenizer.http_server",
            "llmrpc.services.tokenizer.openai_api"} <= set(modules)
    probe = ("import importlib, json, sys\n"
             f"for name in {modules!r}: importlib.import_module(name)\n"
             "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert "llmrpc.services.tokenizer.http_server" in loaded and "llmrpc.services.contract" in loaded
    assert [m for m in loaded if m.startswith(FORBIDDEN) and m not in SHARED] == []
    assert "torch" not in loaded
