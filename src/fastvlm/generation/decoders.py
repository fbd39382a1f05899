"""Prompt embeddings in, next-token logits out, one step at a time, for ``generate``.

Two interchangeable decoders: ``CachedDecoder`` prefills once and then feeds one
token per row over a static KV cache; ``UncachedDecoder`` recomputes the whole
sequence every step (slow, but the plain reference the cached path is tested
against). Both can reorder or repeat their rows (``reorder``), which is how
``generate`` expands a prompt into beams or return sequences and how beam search
follows its surviving hypotheses. They know nothing about sampling or stopping.
"""

from __future__ import annotations

import torch

from ..models.fastvlm import causal_padding_mask


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count from each row's first real token; padding gets 0 (as transformers)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def embed_generated(model, new: torch.Tensor) -> torch.Tensor:
    """(B,) generated ids -> (B, 1, D). Not model.embed: a generated id may equal the
    image placeholder id, and only the prompt's placeholders take image features."""
    return model.language_model.embed_tokens(new[:, None])


class UncachedDecoder:
    """The reference path: every step recomputes the whole sequence from its embeddings."""

    def __init__(self, model, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        self.model, self.mask = model, mask
        self.embeds = embeds  # (B, T, D), grown by one column per step

    def prefill(self) -> torch.Tensor:
        return self._last_logits()

    def step(self, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """new (B,) tokens just chosen; mask (B, S) now includes them."""
        self.embeds = torch.cat([self.embeds, embed_generated(self.model, new)], dim=1)
        self.mask = mask
        return self._last_logits()

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row ``rows[i]`` (rows may repeat, and may be more than B)."""
        self.embeds, self.mask = self.embeds[rows], self.mask[rows]

    def _last_logits(self) -> torch.Tensor:
        positions = generation_positions(self.mask)
        hidden = self.model.language_model(self.embeds, positions, causal_padding_mask(self.mask))
        return self.model.logits(hidden[:, -1])  # (B, V)


class CachedDecoder:
    """Prefill once, then one token per row per step over a static KV cache."""

    def __init__(self, model, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        self.model, self.embeds, self.mask = model, embeds, mask
        B, T, _ = embeds.shape
        self.cache = model.new_cache(B, T + max_new_tokens)
        self.length = T
        self.prompt_positions = generation_positions(mask)  # (B, T)
        self.positions = self.prompt_positions[:, -1:]  # (B, 1), advanced by each step

    def prefill(self) -> torch.Tensor:
        B, T, _ = self.embeds.shape
        slots = torch.arange(T, device=self.embeds.device).expand(B, T)
        mask = causal_padding_mask(self.mask)
        hidden = self.model.language_model(self.embeds, self.prompt_positions, mask, self.cache, slots, T)
        self.embeds = None  # only the cache is needed from here on
        return self.model.logits(hidden[:, -1])  # (B, V)

    def step(self, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """new (B,) tokens just chosen; mask (B, S) now includes them."""
        B = new.shape[0]
        self.positions = self.positions + 1
        slot = torch.full((B, 1), self.length, device=new.device)
        self.length += 1
        keys = mask.bool()[:, None, None, :]  # (B, 1, 1, S): the new token sees every real key
        embeds = embed_generated(self.model, new)
        hidden = self.model.language_model(embeds, self.positions, keys, self.cache, slot, self.length)
        return self.model.logits(hidden[:, -1])

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row ``rows[i]``: the cache's rows (dim 1 of (L, B, nkv, S, hd)) follow."""
        self.cache.k = self.cache.k.index_select(1, rows)
        self.cache.v = self.cache.v.index_select(1, rows)
        self.cache.batch_size = rows.numel()
        self.positions = self.positions[rows]
