"""The processor's output: a dict of model inputs that can be moved as one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class BatchInputs(dict):
    """``{input_ids, attention_mask[, pixel_values]}``; keys also read as attributes.

    ``model(**inputs)`` works because this is a plain dict underneath.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BatchInputs:
        """Move every tensor to ``device``; cast floating tensors (pixels) to ``dtype``.

        Integer tensors (ids, masks) keep their dtype, so ``.to("cuda", torch.bfloat16)``
        is safe. Returns self, like transformers' BatchFeature.
        """
        if isinstance(device, torch.dtype):  # .to(torch.float16)
            device, dtype = None, device
        for key, value in self.items():
            if not isinstance(value, torch.Tensor):
                continue
            target = dtype if dtype is not None and value.is_floating_point() else None
            self[key] = value.to(device=device, dtype=target)
        return self


def pixels_as(pixels: torch.Tensor, return_tensors: str | None) -> Any:
    """Pixels as the caller asked: a tensor ("pt" or None), or a float32 array ("np")."""
    return pixels.numpy() if return_tensors == "np" else pixels


@dataclass
class MultiModalData:
    """Per-input counts that serving code asks processors for (transformers' shape:
    ``num_image_tokens`` and ``num_image_patches`` lists, one entry per image)."""

    num_image_tokens: list[int] | None = None
    num_video_tokens: list[int] | None = None
    num_audio_tokens: list[int] | None = None
    num_image_patches: list[int] | None = None

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    def __getitem__(self, key: str) -> Any:
        if hasattr(self, key):
            return getattr(self, key)
        raise AttributeError(f"MultiModalData has no attribute {key}")
