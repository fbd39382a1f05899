"""Turn ``generate``'s arguments into a plan: inputs, mask, stop ids, lengths, processors.

Each rule mirrors a step of transformers' ``generate`` for a decoder-only model: the
pad id falls back to the first stop id; a missing attention mask is inferred from the
pad id (and a warning says when it cannot be); ``max_new_tokens`` beats ``max_length``,
and a length nobody set means 20 new tokens; with ``inputs_embeds`` alone the returned
sequences hold the new tokens only. Nothing here runs the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import InputError
from .generation_config import GenerationConfig
from .logits_process import ProcessorList, build_processors

StoppingCriterion = Callable[..., "torch.Tensor | bool"]


@dataclass
class Plan:
    cfg: GenerationConfig  # resolved: min_length/max_length are absolute sequence lengths
    ids: torch.Tensor  # (B, P): what the returned sequences start with (P = 0 for embeds only)
    mask: torch.Tensor  # (B, T): over the prompt embeddings
    embeds: torch.Tensor  # (B, T, D)
    eos_ids: list[int]
    pad_id: int | None
    max_new_tokens: int
    processors: ProcessorList
    stopper: Stopper


class Stopper:
    """Which rows are done after a token was appended: length, stop ids, caller's criteria."""

    def __init__(self, max_length: int, eos_ids: Sequence[int], custom: Sequence[StoppingCriterion]) -> None:
        self.max_length, self.eos_ids, self.custom = max_length, list(eos_ids), list(custom)

    def __call__(self, ids: torch.Tensor, scores: tuple | None) -> torch.Tensor:
        B = ids.shape[0]
        done = torch.full((B,), ids.shape[1] >= self.max_length, dtype=torch.bool, device=ids.device)
        if self.eos_ids and ids.shape[1]:
            done |= torch.isin(ids[:, -1], torch.tensor(self.eos_ids, device=ids.device))
        for criterion in self.custom:
            hit = torch.as_tensor(criterion(ids, scores), dtype=torch.bool, device=ids.device)
            done |= hit.expand(B)
        return done


def make_plan(
    model,
    cfg: GenerationConfig,
    set_by_caller_or_checkpoint: set[str],
    input_ids: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    logits_processor: Sequence | None,
    stopping_criteria: Sequence | None,
) -> Plan:
    device = model.device
    ids, embeds = _inputs(model, input_ids, pixel_values, inputs_embeds)
    eos_ids = _id_list(cfg.eos_token_id)
    pad_id = cfg.pad_token_id
    batched = embeds.shape[0] > 1
    if pad_id is None and eos_ids:
        if attention_mask is None and batched:
            warnings.warn(
                "The attention mask and the pad token id were not set, with a batched input; pass the "
                "input's attention_mask to get reliable results",
                stacklevel=4,
            )
        pad_id = eos_ids[0]
    if attention_mask is None:
        mask = _infer_mask(ids, embeds, pad_id, eos_ids, batched)
    else:
        mask = attention_mask.to(device).long()
        if mask.shape != embeds.shape[:2]:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but the prompt is {tuple(embeds.shape[:2])}"
            )
    cfg = _resolve_lengths(model, cfg, set_by_caller_or_checkpoint, ids.shape[1], embeds.shape[1])
    pad_lengths = (mask != 0).int().argmax(dim=1)  # (B,) left padding, ignored by the penalty
    processors = build_processors(cfg, eos_ids, pad_lengths, list(logits_processor or []))
    stopper = Stopper(cfg.max_length, eos_ids, list(stopping_criteria or []))
    new = max(cfg.max_length - ids.shape[1], 0)
    return Plan(cfg, ids, mask, embeds, eos_ids, pad_id, new, processors, stopper)


def _inputs(model, input_ids, pixel_values, inputs_embeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), embeds (B, T, D)) on the model's device."""
    device = model.device
    if inputs_embeds is None:
        if input_ids is None:
            raise InputError("generate needs input_ids or inputs_embeds")
        ids = input_ids.to(device)
        if ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, length), not shape {tuple(ids.shape)}")
        feats = model.encode_images(pixel_values) if pixel_values is not None else None
        return ids, model.embed(ids, feats)
    if pixel_values is not None:
        raise InputError(
            "pass pixel_values with input_ids, not with inputs_embeds: inputs_embeds must already "
            "hold the image features (model.embed(input_ids, model.encode_images(pixel_values)))"
        )
    embeds = inputs_embeds.to(device, model.dtype)
    if embeds.dim() != 3:
        raise InputError(f"inputs_embeds must be (batch, length, hidden), not shape {tuple(embeds.shape)}")
    if input_ids is None:
        return torch.empty(embeds.shape[0], 0, dtype=torch.long, device=device), embeds
    if input_ids.shape != embeds.shape[:2]:
        raise InputError(
            f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(embeds.shape[:2])} "
            "disagree in shape"
        )
    return input_ids.to(device), embeds


def _infer_mask(ids, embeds, pad_id, eos_ids, batched) -> torch.Tensor:
    """transformers' rule: pads are padding unless the pad id is also a stop id."""
    ones = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    if pad_id is None or ids.shape[1] == 0 or not bool((ids == pad_id).any()):
        return ones
    if pad_id in eos_ids:
        if batched:
            warnings.warn(
                "The attention mask is not set with a batched input, and cannot be inferred from input "
                "because pad token is same as eos token; pass the input's attention_mask to get "
                "reliable results",
                stacklevel=5,
            )
        return ones
    return (ids != pad_id).long()


def _resolve_lengths(model, cfg: GenerationConfig, set_by: set[str], prompt: int, embeds: int):
    """Absolute max_length/min_length, as transformers' ``_prepare_generated_length``."""
    text = getattr(model.config, "text", None)
    max_positions = getattr(text, "max_position_embeddings", None)
    embeds_only = prompt != embeds
    if cfg.max_new_tokens is not None:
        max_length = cfg.max_new_tokens + prompt
    elif "max_length" not in set_by:
        max_length = cfg.max_length + prompt  # "by default, 20 new tokens"
        max_length = min(max_length, max_positions) if max_positions else max_length
    else:
        max_length = cfg.max_length - embeds if embeds_only else cfg.max_length
        if max_length <= prompt:
            raise InputError(
                f"the prompt is {prompt} tokens but max_length is {cfg.max_length}; raise max_length "
                "or, better, set max_new_tokens"
            )
    if cfg.min_new_tokens is not None:
        min_length = cfg.min_new_tokens + prompt
    else:
        min_length = max(cfg.min_length - embeds, 0) if embeds_only else cfg.min_length
    return replace(cfg, max_length=max_length, min_length=min_length)


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]
