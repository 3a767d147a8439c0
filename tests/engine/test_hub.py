"""Hub ids (`--model ORG/NAME[@REVISION]`) through `llmrpc download`, against an HF cache built here.

The cache has huggingface_hub's own layout (blobs, snapshots/<commit> of links to
them, refs/main). Unreachable Hubs are real: an endpoint on a closed loopback
port, or the machine's own lack of network.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.hub import model_name, parse_hub_id
from llmrpc.services.rpc import free_port

REV_OLD, REV_MAIN = "1" * 40, "2" * 40


def write_hf_cache(cache: Path, repo: str, revision: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """Adds `files` as snapshot `revision` of model `repo` (refs/<ref> pointing at it); returns the snapshot."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for filename, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(revision)
    return snapshot


def download(cache: Path, model: str, offline: bool = False, endpoint: str | None = "dead") -> tuple[
        subprocess.CompletedProcess, float]:
    """`llmrpc download --model MODEL` with `cache` as the HF cache; (the process, its seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMRPC_", "HF_"))}
    env["HF_HUB_CACHE"] = str(cache)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint == "dead":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "llmrpc.services.cli", "download", "--model", model],
                          capture_output=True, text=True, timeout=120, env=env)
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf-cache")
    write_hf_cache(root, "acme/tiny", REV_OLD, {"config.json": b'{"v": "old"}'}, ref=None)
    write_hf_cache(root, "acme/tiny", REV_MAIN, {"config.json": b'{"v": "main"}', "tokenizer.json": b"{}"})
    return root


def test_hub_ids_and_cache_snapshot_names() -> None:
    assert parse_hub_id("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert parse_hub_id("mistralai/Mistral-7B-v0.3@refs/pr/1") == ("mistralai/Mistral-7B-v0.3", "refs/pr/1")
    for not_an_id in ("model", "./org/name", "/abs/org/name", "a/b/c", "~/x/y", "org/na me"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    snapshot = Path("/c/models--Qwen--Qwen3-30B-A3B/snapshots") / REV_MAIN
    assert model_name(snapshot) == "Qwen/Qwen3-30B-A3B"
    assert model_name(Path("/models/qwen3-8b")) == "qwen3-8b"


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_cached_model_is_served_from_the_cache(cache: Path, offline: bool) -> None:
    done, seconds = download(cache, "acme/tiny", offline=offline)
    assert done.returncode == 0, done.stderr
    snapshot = cache / "models--acme--tiny" / "snapshots" / REV_MAIN  # refs/main's commit
    assert done.stdout.strip() == str(snapshot)
    assert (Path(done.stdout.strip()) / "config.json").read_text() == '{"v": "main"}'
    assert seconds < 30


def test_a_revision_picks_its_snapshot(cache: Path) -> None:
    done, _ = download(cache, f"acme/tiny@{REV_OLD}", offline=True)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "config.json").read_text() == '{"v": "old"}'


@pytest.mark.parametrize("endpoint", ["dead", None], ids=["closed-port", "this-machine"])
def test_a_model_missing_from_the_cache_fails_fast_naming_it(cache: Path, endpoint: str | None) -> None:
    # "this-machine": the real Hub endpoint, as a user without network (or, online, a made-up repo) meets it.
    done, seconds = download(cache, "acme/not-cached-anywhere", endpoint=endpoint)
    assert done.returncode == 1 and done.stdout == ""
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("--model: acme/not-cached-anywhere: "), done.stderr
    assert "give a local path (an HF directory or a .gguf file)" in message or "give a local path instead" in message
    assert seconds < 30, seconds


def test_offline_without_the_model_says_so(cache: Path) -> None:
    done, seconds = download(cache, "acme/tiny@main-not-a-ref", offline=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "--model: acme/tiny@main-not-a-ref: HF_HUB_OFFLINE is set and the HF cache holds no snapshot of it; "
        "download it where there is network (llmrpc download --model acme/tiny@main-not-a-ref) or give a "
        "local path (an HF directory or a .gguf file)")
    assert seconds < 30


def test_a_local_path_that_is_no_hub_id_is_refused_as_before(tmp_path: Path) -> None:
    done, _ = download(tmp_path, str(tmp_path / "missing-model"))
    assert done.returncode == 1
    assert "does not exist (give a local HF directory, a .gguf file or a Hub id ORG/NAME[@REVISION])" in done.stderr


def test_a_snapshot_serves_under_its_hub_name(tmp_path: Path) -> None:
    config = (b'{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, '
              b'"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    snapshot = write_hf_cache(tmp_path, "acme/tiny-llama", REV_MAIN, {"config.json": config})
    assert ModelConfig.load(snapshot).name == "acme/tiny-llama"
