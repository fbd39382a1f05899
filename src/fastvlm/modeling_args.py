"""transformers' ``from_pretrained`` and ``forward`` arguments, mapped onto ours or refused.

``FastVLM`` (``fastvlm.modeling``) takes the arguments transformers' FastVLM docs and
tests pass. This module decides what each means here: ``dtype="auto"`` is the
checkpoint's dtype, ``device_map`` a single device, ``attn_implementation`` the
attention kernels of ``SpeedOptions``. Anything we do not implement is refused with one
``InputError`` line that names it, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints.files import read_config_json
from .checkpoints.hub import resolve_checkpoint
from .checkpoints.loader import stored_dtype
from .config import FastVLMConfig
from .device import resolve_device, resolve_dtype
from .errors import InputError
from .models.attention import flash_attn_available
from .models.fastvlm import check_feature_selection
from .models.optimize import SpeedOptions

# Accepted and without effect here: we never run checkpoint code (both formats load
# natively), always load tensor by tensor, and prefer safetensors whenever present.
IGNORED = {"trust_remote_code", "low_cpu_mem_usage", "use_safetensors"}
HINTS = {
    "quantization_config": "use speed=SpeedOptions(int8=True) or SpeedOptions(int4=True)",
    "token": "set HF_TOKEN or run `hf auth login`",
    "cache_dir": "set HF_HUB_CACHE",
    "local_files_only": "set HF_HUB_OFFLINE=1",
    "max_memory": "the model is placed on one device",
}


@dataclass
class LoadPlan:
    folder: Path
    dtype: torch.dtype
    device: torch.device
    speed: SpeedOptions


def plan_load(
    src: str | os.PathLike,
    *,
    dtype: Any,
    device: Any,
    device_map: Any,
    attn_implementation: Any,
    speed: SpeedOptions | None,
    revision: str | None,
    extra: dict[str, Any],
) -> LoadPlan:
    """Where, in which dtype and with which switches ``from_pretrained`` loads ``src``."""
    extra = dict(extra)
    torch_dtype = extra.pop("torch_dtype", None)  # transformers' older name for dtype
    _refuse_unknown("FastVLM.from_pretrained", extra, IGNORED)
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise InputError("pass dtype or torch_dtype (its older name), not both")
        dtype = torch_dtype
    dev = resolve_device(_placement(device, device_map))
    folder = resolve_checkpoint(src, revision=revision)
    if dtype is None or dtype == "auto":
        dtype = stored_dtype(folder, FastVLMConfig.from_dict(read_config_json(folder)))
    speed = SpeedOptions() if speed is None else speed
    text, vision = attention_choice(attn_implementation, dev)
    if text is not None:
        speed = dataclasses.replace(speed, attention=text, vision_attention=vision)
    return LoadPlan(folder, resolve_dtype(dtype, dev), dev, speed)


def _refuse_unknown(where: str, kwargs: dict[str, Any], ignored: set[str]) -> None:
    unknown = [k for k in kwargs if k not in ignored]
    if unknown:
        name = unknown[0]
        hint = HINTS.get(name, "it is not supported")
        raise InputError(f"{where} does not take {name!r}: {hint}")


def _placement(device: Any, device_map: Any) -> Any:
    """One device from ``device`` and transformers' ``device_map``; the model is never split."""
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        places = {str(torch.device(v) if isinstance(v, int) else v) for v in device_map.values()}
        if len(places) != 1:
            raise InputError(f"device_map {device_map} splits the model; give one device (or 'auto')")
        device_map = places.pop()
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    if device_map == "auto":
        device_map = None  # CUDA, else MPS, else CPU, as resolve_device picks
    elif isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise InputError(f"device_map {device_map!r} splits the model; use 'auto' or a device")
    if device is not None and device_map is not None and torch.device(device) != torch.device(device_map):
        raise InputError(f"device {device!r} and device_map {device_map!r} disagree; pass one")
    return device if device_map is None else device_map


def attention_choice(attn: Any, device: torch.device) -> tuple[str | None, str]:
    """(decoder kernel, vision kernel) for transformers' ``attn_implementation``; (None, ...) if unset."""
    if attn is None:
        return None, "sdpa"
    if isinstance(attn, str):
        if attn == "flash_attention_2":
            raise InputError(
                "attn_implementation='flash_attention_2' is not supported for the whole model: the vision "
                "tower has no flash-attention path (transformers refuses it too); pass "
                "attn_implementation={'text_config': 'flash_attention_2'}"
            )
        attn = {"": attn}
    if not isinstance(attn, dict) or set(attn) - {"", "text_config", "vision_config"}:
        raise InputError(
            f"attn_implementation {attn!r}: give 'eager', 'sdpa', or a dict with 'text_config' and "
            "'vision_config' keys"
        )
    default = attn.get("", "sdpa")
    text, vision = attn.get("text_config", default), attn.get("vision_config", default)
    if text not in ("eager", "sdpa", "flash_attention_2"):
        raise InputError(f"text attn_implementation {text!r}: use 'eager', 'sdpa' or 'flash_attention_2'")
    if vision not in ("eager", "sdpa"):
        raise InputError(f"vision attn_implementation {vision!r}: the vision tower has 'eager' and 'sdpa'")
    if text == "flash_attention_2":
        why = _flash_unavailable(device)
        if why:
            _say_once(f"flash_attention_2 for the decoder: {why}; using SDPA")
            text = "sdpa"
    return text, vision


def _flash_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only (the model is on {device.type})"
    if not flash_attn_available():
        return "the flash-attn package is not installed"
    return None


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, stacklevel=4)


# ---- forward -------------------------------------------------------------------------------

FORWARD_ARGS = {"labels", "position_ids", "image_features", "inputs_embeds", "logits_to_keep"}


def forward_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(our forward's arguments, return_dict) from transformers-style ``forward`` kwargs."""
    kwargs = dict(kwargs)
    check_feature_selection(
        kwargs.pop("vision_feature_layer", None), kwargs.pop("vision_feature_select_strategy", None)
    )
    return_dict = kwargs.pop("return_dict", None) is not False
    mm = kwargs.pop("mm_encoder_outputs", None)
    if mm and mm.get("image") is not None:
        kwargs["image_features"] = mm["image"].pooler_output
    for name, why in [
        ("use_cache", "forward runs without a KV cache; use generate() to decode"),
        ("past_key_values", "forward runs without a KV cache; use generate() to decode"),
        ("cache_position", "forward runs without a KV cache; use generate() to decode"),
        ("output_attentions", "attention weights are never returned"),
        ("output_hidden_states", "hidden states are never returned"),
    ]:
        if kwargs.pop(name, None):
            raise InputError(f"forward does not take {name}: {why}")
    unknown = sorted(set(kwargs) - FORWARD_ARGS)
    if unknown:
        raise InputError(f"forward does not take {unknown[0]!r}")
    return kwargs, return_dict
