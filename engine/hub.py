"""Hugging Face Hub ids as models: `ORG/NAME[@REVISION]` resolved to a snapshot in the standard HF cache.

Only what the engine and the tokenizer read is fetched (config, tokenizer and
safetensors files), with huggingface_hub's progress bar, into the cache it manages
(HF_HOME / HF_HUB_CACHE, ~/.cache/huggingface/hub by default). The revision is
pinned to a commit first, so every file comes from one snapshot. Without network
(or with HF_HUB_OFFLINE=1) the cached snapshot of that revision is served; when
the cache lacks it, resolution fails within seconds naming the model.

Also the model's tokenizer (`load_tokenizer`), which the tokenizer service and the worker
(for grammar-constrained decoding) both load from the model path.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# What a served model needs: configs and index (*.json), HF-layout weight shards (not Mistral's
# duplicate consolidated.safetensors), and tokenizer files of every kind transformers reads.
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
                  "*.jinja"]
HUB_TIMEOUT_S = 10.0

_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_CACHE_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def load_tokenizer(model_path: str | Path) -> Any:
    """A fast Hugging Face tokenizer from an HF directory or a `.gguf` file."""
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is loaded

    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


class HubModelError(ValueError):
    """A Hub id that cannot be served: not on the Hub, not reachable and not cached, ..."""


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """("ORG/NAME", revision or None) when `model` has the form of a Hub id, else None."""
    match = _HUB_ID.match(model)
    if match is None or model.startswith((".", "/", "~")):
        return None
    return match["repo"], match["revision"]


def model_name(model_dir: Path) -> str:
    """The name a model directory is served under: ORG/NAME for an HF cache snapshot, else the folder's name."""
    parts = model_dir.resolve().parts if model_dir.exists() else model_dir.parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        match = _CACHE_SNAPSHOT.match(parts[-3])
        if match:
            return f"{match['org']}/{match['name']}"
    return model_dir.name


def resolve_hub_model(model: str, timeout_s: float = HUB_TIMEOUT_S) -> Path:
    """The local snapshot directory of Hub id `model`, downloading what the cache lacks."""
    parsed = parse_hub_id(model)
    if parsed is None:
        raise HubModelError(f"{model!r} is not a Hub id (ORG/NAME or ORG/NAME@REVISION)")
    repo, revision = parsed
    from huggingface_hub import HfApi, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Newer huggingface_hub says when a cached snapshot lacks files; older ones return it as is.
    incomplete: tuple[type[Exception], ...] = tuple(
        c for c in [getattr(errors, "IncompleteSnapshotError", None)] if isinstance(c, type))

    try:
        # One short call pins the revision to a commit, so a dead network is known within the timeout.
        commit = HfApi().repo_info(repo, revision=revision, timeout=timeout_s).sha
    except RevisionNotFoundError:
        raise HubModelError(f"{model}: the Hub has no revision {revision!r} of {repo}") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise HubModelError(f"{model}: not found on the Hugging Face Hub, or not accessible without a token "
                            f"({type(exc).__name__}); give a local path instead (an HF directory or a .gguf file)"
                            ) from None
    except Exception as exc:  # no network, a timeout, offline mode, the Hub down: the cache may still serve
        try:
            return Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                          allow_patterns=ALLOW_PATTERNS))
        except incomplete as partial:
            raise HubModelError(f"{model}: {partial}") from None
        except LocalEntryNotFoundError:
            reason = "HF_HUB_OFFLINE is set" if isinstance(exc, OfflineModeIsEnabled) else (
                f"the Hugging Face Hub is unreachable ({type(exc).__name__})")
            raise HubModelError(f"{model}: {reason} and the HF cache holds no snapshot of it; download it where "
                                f"there is network (llmrpc download --model {model}) or give a local path "
                                f"(an HF directory or a .gguf file)") from None
    return Path(snapshot_download(repo, revision=commit, allow_patterns=ALLOW_PATTERNS, etag_timeout=timeout_s))
