"""The default model's tokenizer, loaded once for all tokenizer tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmrpc.services.tokenizer.template import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    return load_tokenizer(default_model_dir)
