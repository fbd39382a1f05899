"""Recognise a checkpoint's format from its config.json alone.

Two published layouts exist:

* ``fast_vlm``: Hugging Face transformers' ``FastVlmForConditionalGeneration``
  (vision tower = timm ``fastvit_mci3``), image placeholder ``<image>`` in the vocabulary.
* ``llava_qwen2``: Apple's original ml-fastvlm code, image marked by -200 in ``input_ids``.

The format decides key names, the prompt format and image preprocessing, so it is
decided once here and never guessed from tensor shapes or file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError

Format = Literal["fast_vlm", "llava_qwen2"]
HF_FORMAT: Format = "fast_vlm"
APPLE_FORMAT: Format = "llava_qwen2"


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing; point at a FastVLM checkpoint folder") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint") from exc


def detect_format(config: dict[str, Any]) -> Format:
    model_type = config.get("model_type")
    if model_type == HF_FORMAT:
        return HF_FORMAT
    if model_type == APPLE_FORMAT or (model_type == "qwen2" and "mm_vision_tower" in config):
        return APPLE_FORMAT
    raise CheckpointError(
        f"config.json has model_type {model_type!r}, not a FastVLM checkpoint; expected "
        f"'{HF_FORMAT}' (transformers) or '{APPLE_FORMAT}' (Apple ml-fastvlm)"
    )
