"""Read the JSON and text files of a checkpoint folder.

``config.json`` must exist; the other files are optional (old and new file sets
differ), so a missing one gives ``None``. A file that exists but cannot be parsed is
a ``CheckpointError`` either way. What the files mean is decided elsewhere: the format
and architecture in ``fastvlm.config``, the processor settings in ``fastvlm.processing``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing; point at a FastVLM checkpoint folder") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint") from exc


def read_optional_json(folder: Path, name: str) -> dict[str, Any] | None:
    """The parsed JSON object in ``folder/name``, or None if the file is absent."""
    text = read_optional_text(folder, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{folder / name} is not valid JSON ({exc}); re-download the checkpoint"
        ) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{folder / name} should hold a JSON object; re-download the checkpoint")
    return value


def read_optional_text(folder: Path, name: str) -> str | None:
    """The UTF-8 text of ``folder/name``, or None if the file is absent."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); re-download the checkpoint") from exc
