"""Turn a checkpoint source (a local directory or a hub id) into a local directory.

This module owns every network access for weights. Nothing else in the package
downloads checkpoint files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError

# The checkpoint every entry point (load, run, chat, serve, batch, finetune) uses unless told otherwise.
DEFAULT_MODEL = "apple/FastVLM-0.5B"

# Files a checkpoint folder may hold that we can use; weights of other formats
# (pickles other than a plain state dict, GGUF, ...) are never fetched.
_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
]


def resolve_checkpoint(src: str | os.PathLike, *, revision: str | None = None, weights: bool = True) -> Path:
    """Return a local directory for ``src``, downloading it from the hub if needed.

    ``src`` is tried as a local path first; anything that is not an existing
    directory and looks like ``owner/name`` is treated as a hub id. With
    ``weights=False`` a download skips the weight files (config and tokenizer only).
    """
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; point at a FastVLM checkpoint folder")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json")
    text = str(src)
    if not _hub_id_shaped(text):
        raise CheckpointError(
            f"{text!r} is neither a local checkpoint folder nor a hub id like 'apple/FastVLM-0.5B'"
        )
    return _download(text, revision, weights)


def is_hub_id(src: str | os.PathLike) -> bool:
    """Whether ``resolve_checkpoint`` would treat ``src`` as a hub id."""
    return not Path(src).expanduser().exists() and _hub_id_shaped(str(src))


def _hub_id_shaped(text: str) -> bool:
    """``owner/name``: one slash, and not a relative or absolute path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def hub_safetensors_headers(repo_id: str, revision: str | None = None) -> list[tuple[dict, int]]:
    """(header, tensor bytes) of each safetensors file in a hub repository.

    Only the JSON headers travel (HTTP range requests), never the weights.
    """
    from huggingface_hub import get_safetensors_metadata

    try:
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as exc:  # offline, not found, gated, not safetensors: one line each way
        raise CheckpointError(
            f"could not read the weight headers of {repo_id!r} ({type(exc).__name__}); check the "
            "network, or pass a local checkpoint folder"
        ) from exc
    headers = []
    for file in metadata.files_metadata.values():
        header = {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in file.tensors.items()}
        headers.append((header, max((t.data_offsets[1] for t in file.tensors.values()), default=0)))
    return headers


def _download(repo_id: str, revision: str | None, weights: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a hard dependency
        raise CheckpointError("huggingface_hub is required to download checkpoints") from exc
    try:
        # snapshot_download shows a tqdm progress bar per file on stderr.
        patterns = _ALLOW_PATTERNS if weights else [p for p in _ALLOW_PATTERNS if p != "*.safetensors"]
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise CheckpointError(f"hub repository {repo_id!r} was not found or is not accessible") from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"could not download {repo_id!r}: the hub is unreachable and the model is not in the "
            "local cache; download it on a connected machine or pass a local checkpoint folder"
        ) from exc
    except OSError as exc:
        raise CheckpointError(
            f"could not download {repo_id!r} ({type(exc).__name__}); check the network, or pass a "
            "local checkpoint folder"
        ) from exc
    return Path(local)
