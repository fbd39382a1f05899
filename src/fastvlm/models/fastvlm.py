"""FastVLM: FastViTHD -> two-layer GELU projector -> Qwen2, with a language-model head.

Image features replace the image placeholder positions of the embedded prompt, in
order. The model works on tensors only: tokenisation and image preprocessing live
in ``fastvlm.processing``, loading in ``fastvlm.checkpoints``, decoding loops in
``fastvlm.generation``. ``fastvlm.FastVLM`` (in ``fastvlm.modeling``, above all of
those) adds the transformers-style ``from_pretrained`` and ``generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FastVLMConfig
from ..errors import InputError
from .activations import activation
from .cache import KVCache
from .fastvithd import FastViTHD
from .outputs import CausalLMOutput, ImageFeaturesOutput
from .qwen2 import Qwen2Model

__all__ = ["CausalLMOutput", "FastVLMCore", "ImageFeaturesOutput", "causal_lm_loss", "causal_padding_mask"]


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
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def _feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.vision_tower.stem[0].reparam_conv.weight.dtype
        return self.vision_tower(pixel_values.to(self.device, dtype))  # (B, C, h, w)

    def _project(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major over the map
        return self.projector(tokens)  # (B, h*w, H)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N, H) projected features, N = (S/64)^2."""
        return self._project(self._feature_map(pixel_values))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> ImageFeaturesOutput:
        """As transformers: ``.pooler_output`` is ``encode_images(pixel_values)``, ``.last_hidden_state``
        the tower's (B, C, h, w) map."""
        check_feature_selection(vision_feature_layer, vision_feature_select_strategy)
        fmap = self._feature_map(pixel_values)
        return ImageFeaturesOutput(last_hidden_state=fmap, pooler_output=self._project(fmap))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Embed tokens and write image features over the placeholder positions, in order."""
        is_image = input_ids == self.config.image_token_id
        # The placeholder id may lie outside the vocabulary (tiny test models, -200 style ids).
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        return self.merge_images(embeds, is_image, image_features)

    def merge_images(
        self, embeds: torch.Tensor, is_image: torch.Tensor, image_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Write ``image_features`` (n, N, H) over the (B, T) positions ``is_image`` marks, in order."""
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

    def _placeholders_in(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image positions of ready-made embeddings: rows equal to the placeholder's embedding,
        as transformers finds them when it gets ``inputs_embeds`` instead of ids."""
        table = self.language_model.embed_tokens
        if self.config.image_token_id >= table.num_embeddings:
            raise InputError(
                f"the image placeholder id {self.config.image_token_id} has no embedding row; "
                "pass input_ids with pixel_values instead of inputs_embeds"
            )
        row = table(torch.tensor(self.config.image_token_id, device=embeds.device)).to(embeds.dtype)
        return (embeds == row).all(-1)  # (B, T)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # -- full-sequence forward -------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutput:
        """Full-sequence forward (no cache). Positions default to 0..T-1, as in transformers.

        Give ``input_ids`` or ``inputs_embeds`` (B, T, D), not both; with ``inputs_embeds``
        and pixels, the image positions are the rows equal to the placeholder's embedding.
        ``logits_to_keep``: an int N keeps the last N positions' logits (0: all), a tensor
        the positions it lists, as transformers.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if inputs_embeds is None:
            embeds = self.embed(input_ids.to(self.device), image_features)
        else:
            embeds = inputs_embeds.to(self.device, self.dtype)
            if image_features is not None:
                embeds = self.merge_images(embeds, self._placeholders_in(embeds), image_features)
        B, T, _ = embeds.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=self.device).expand(B, T)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask.to(self.device))
        hidden = self.language_model(embeds, position_ids.to(self.device), mask)  # (B, T, D)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep.to(self.device)]
        logits = self.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels.to(self.device))
        return CausalLMOutput(loss=loss, logits=logits, image_hidden_states=image_features)

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


def check_feature_selection(layer: int | None, strategy: str | None) -> None:
    """FastVLM has one feature map (the last) and uses all of it; transformers refuses others too."""
    if layer not in (None, -1) or strategy not in (None, "full"):
        raise InputError(
            f"vision_feature_layer {layer!r} / vision_feature_select_strategy {strategy!r}: FastVLM "
            "has only -1 and 'full'"
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # (B, T)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=ignore_index
    )
