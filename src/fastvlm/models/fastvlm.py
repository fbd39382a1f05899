"""FastVLM: FastViTHD -> two-layer GELU projector -> Qwen2, with a language-model head.

Image features replace the image placeholder positions of the embedded prompt, in
order. The model works on tensors only: tokenisation and image preprocessing live
in ``fastvlm.processing``, loading in ``fastvlm.checkpoints``, decoding loops in
``fastvlm.generation``. ``fastvlm.FastVLM`` (in ``fastvlm.modeling``, above all of
those) adds the transformers-style ``from_pretrained`` and ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FastVLMConfig
from .activations import activation
from .cache import KVCache
from .fastvithd import FastViTHD
from .qwen2 import Qwen2Model


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Projector(nn.Module):
    def __init__(self, cfg: FastVLMConfig) -> None:
        super().__init__()
        hidden = cfg.text.hidden_size
        self.linear_1 = nn.Linear(cfg.vision.num_features, hidden, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_hidden_act, "projector_hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> boolean (B, 1, T, T) "may attend" mask.

    A query sees earlier real tokens. Each query also sees itself, so that padding
    rows have at least one key: an all-masked row would turn into NaN and leak into
    real rows through the next layer's values.
    """
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye  # (B, 1, T, T)


class FastVLMCore(nn.Module):
    """The network, built from a config with random (or meta) weights; see the module doc."""

    def __init__(self, config: FastVLMConfig, *, source: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.source = source  # the checkpoint folder the weights came from, if any
        self.vision_tower = FastViTHD(config.vision)
        self.projector = Projector(config)
        self.language_model = Qwen2Model(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def extra_repr(self) -> str:
        return f"source={self.source!r}"

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    # -- pieces ------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N, H) projected features, N = (S/64)^2."""
        dtype = self.vision_tower.stem[0].reparam_conv.weight.dtype
        fmap = self.vision_tower(pixel_values.to(self.device, dtype))  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major over the map
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Embed tokens and write image features over the placeholder positions, in order."""
        is_image = input_ids == self.config.image_token_id
        # The placeholder id may lie outside the vocabulary (tiny test models, -200 style ids).
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"Image features and image tokens do not match: {n_slots} image placeholder tokens "
                f"(id {self.config.image_token_id}) in input_ids, {n_feats} image features"
            )
        if n_feats:
            feats = image_features.to(embeds.dtype).reshape(-1, embeds.shape[-1])  # (n_feats, D)
            embeds = embeds.masked_scatter(is_image[..., None], feats)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # -- full-sequence forward -------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Full-sequence forward (no cache). Positions default to 0..T-1, as in transformers."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        embeds = self.embed(input_ids, image_features)
        if position_ids is None:
            position_ids = torch.arange(T, device=self.device).expand(B, T)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask.to(self.device))
        hidden = self.language_model(embeds, position_ids.to(self.device), mask)
        logits = self.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels.to(self.device))
        return CausalLMOutput(logits=logits, loss=loss)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        t = self.config.text
        return KVCache(
            t.num_hidden_layers,
            batch_size,
            t.num_key_value_heads,
            max_len,
            t.head_dim,
            dtype=self.dtype,
            device=self.device,
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # (B, T)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index
    )
