"""What the model's ``forward`` and ``get_image_features`` return, shaped like transformers'.

Like transformers' ``ModelOutput``: fields read as attributes or keys, unset (None)
fields are not keys, and an integer index (or ``to_tuple()``) walks the set fields in
order, so ``model(...)[0]`` is the logits when no labels were given, as there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    def _set_fields(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self._set_fields()[key][1]
        value = getattr(self, key, None)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    def keys(self) -> list[str]:
        return [name for name, _ in self._set_fields()]

    def to_tuple(self) -> tuple:
        return tuple(value for _, value in self._set_fields())


@dataclass
class CausalLMOutput(ModelOutput):
    """transformers' ``FastVlmCausalLMOutputWithPast``. ``image_hidden_states``: the
    projected image features (n_images, N, H) when pixels were given. The cache, hidden
    states and attentions are never returned (``forward`` runs without a cache)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: None = None
    hidden_states: None = None
    attentions: None = None
    image_hidden_states: torch.Tensor | None = None


@dataclass
class ImageFeaturesOutput(ModelOutput):
    """transformers' ``BaseModelOutputWithPooling`` from ``get_image_features``:
    ``last_hidden_state`` is the tower's (B, C, h, w) map, ``pooler_output`` the projected
    (B, h*w, H) features that take the image placeholders' places."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: None = None
    attentions: None = None
