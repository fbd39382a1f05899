"""Preparing the plain model for training: LoRA (by ``peft``), what learns, checkpointing.

``peft.inject_adapter_in_model`` wraps our decoder's ``nn.Linear`` projections in place;
its LoRA layers (Kaiming A, zero B, dropout on the input) are the ones transformers users
train. Saving strips PEFT's adapter name and renames to transformers' modules
(``adapter.save_adapter``), so the file is the one PEFT itself would write.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ..checkpoints.adapter import LORA_TARGETS, LoraSettings
from ..errors import InputError

ADAPTER_NAME = "default"


def check_targets(targets: list[str]) -> tuple[str, ...]:
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise InputError(
            f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}; "
            f"use some of {','.join(LORA_TARGETS)}"
        )
    return tuple(dict.fromkeys(targets))


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap the decoder's target projections in LoRA layers (trainable, float32)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("LoRA training needs peft: pip install 'fastvlm[train]', or use --full") from None
    # A full-match pattern on our names keeps LoRA out of the vision tower whatever it calls its layers.
    pattern = r"language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(settings.targets) + ")"
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        use_rslora=settings.use_rslora,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()  # optimiser state and updates in float32


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved names (no adapter name): ``...q_proj.lora_A.weight``."""
    tag = f".{ADAPTER_NAME}."
    return {n.replace(tag, "."): p for n, p in model.named_parameters() if ".lora_" in n}


def set_trainable(model: nn.Module, *, full: bool, projector: bool, vision: bool) -> list[str]:
    """Freeze everything but what the recipe trains; trained base weights move to float32.

    Returns the top-level modules trained whole (for the adapter's ``modules_to_save``).
    """
    whole = ["projector"] * projector + ["vision_tower"] * vision
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        param.requires_grad_(full or ".lora_" in name or top in whole)
        if param.requires_grad:
            param.data = param.data.float()
    return [] if full else whole


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    The layer's bound ``forward`` is replaced on the instance, so parameter names (and the
    saved adapter's keys) stay those of the plain model.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.language_model.layers:
        plain = layer.forward
        layer.forward = partial(checkpoint, plain, use_reentrant=False)


def channels_last_vision(model) -> None:
    """NHWC convolutions in the vision tower, as inference uses: on CPU (oneDNN) the
    FastViTHD forward at 1024 px is several times faster, trained or frozen."""
    from ..models.optimize import SpeedOptions, optimize

    optimize(model, replace(SpeedOptions.off(), channels_last=True))
