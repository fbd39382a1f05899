"""transformers-style ``generate``: prompt in, prompt + new tokens out.

This is the low-level call behind ``FastVLM.generate``. With ``use_cache=False`` it
recomputes the whole sequence every step: slow, but the plain reference that the
cached path (and the batching engine) are tested against.
"""

from __future__ import annotations

import torch

from ..models.fastvlm import causal_padding_mask
from .sampling import SamplingParams, sample_rows


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count from each row's first real token; padding gets 0 (as transformers)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _next_tokens(logits, params, generator, ids, done, pad_id) -> torch.Tensor:
    """One token per row from (B, V) logits; finished rows get ``pad_id`` and draw no sample."""
    out = torch.full((logits.shape[0],), pad_id, dtype=torch.long)
    live = (~done).nonzero().flatten().tolist()
    picked, failed = sample_rows(
        logits[live], [params] * len(live), [generator] * len(live), [ids[b] for b in live]
    )
    if failed:  # one call for the whole batch: a row's failure is the call's
        raise next(iter(failed.values()))
    out[live] = torch.tensor(picked, dtype=torch.long)
    return out.to(ids.device)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    device = model.device
    ids = input_ids.to(device)
    B, T = ids.shape
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    params = SamplingParams(
        temperature=temperature if do_sample else 0.0,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    # As in transformers: unset stop/pad ids come from the checkpoint's generation config.
    eos_ids = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos_list = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    eos = set(eos_list)
    pad_id = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    pad_id = pad_id if pad_id is not None else (eos_list[0] if eos_list else 0)
    feats = model.get_image_features(pixel_values) if pixel_values is not None else None
    done = torch.zeros(B, dtype=torch.bool)
    if use_cache:
        decoder = _CachedDecoder(model, ids, feats, mask, max_new_tokens)
    else:
        decoder = _UncachedDecoder(model, ids, feats, mask)
    logits = decoder.prefill()
    for i in range(max_new_tokens):
        new = _next_tokens(logits, params, generator, ids, done, pad_id)
        ids = torch.cat([ids, new[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        done |= torch.tensor([int(t) in eos for t in new])
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = decoder.step(new, mask)
    return ids


def _embed_generated(model, new: torch.Tensor) -> torch.Tensor:
    """(B,) generated ids -> (B, 1, D). Not model.embed: a generated id may equal the
    image placeholder id, and only the prompt's placeholders take image features."""
    return model.language_model.embed_tokens(new[:, None])


class _UncachedDecoder:
    """The reference path: every step recomputes the whole sequence from its embeddings."""

    def __init__(self, model, ids, feats, mask) -> None:
        self.model, self.mask = model, mask
        self.embeds = model.embed(ids, feats)  # (B, T, D), grown by one column per step

    def prefill(self) -> torch.Tensor:
        return self._last_logits()

    def step(self, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """new (B,) tokens just chosen; mask (B, S) now includes them."""
        self.embeds = torch.cat([self.embeds, _embed_generated(self.model, new)], dim=1)
        self.mask = mask
        return self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        positions = generation_positions(self.mask)
        hidden = self.model.language_model(self.embeds, positions, causal_padding_mask(self.mask))
        return self.model.logits(hidden[:, -1])  # (B, V)


class _CachedDecoder:
    """Prefill once, then one token per row per step over a static KV cache."""

    def __init__(self, model, ids, feats, mask, max_new_tokens: int) -> None:
        self.model, self.ids, self.feats, self.mask = model, ids, feats, mask
        B, T = ids.shape
        self.cache = model.new_cache(B, T + max_new_tokens)
        self.length = T
        self.prompt_positions = generation_positions(mask)  # (B, T)
        self.positions = self.prompt_positions[:, -1:]  # (B, 1), advanced by each step

    def prefill(self) -> torch.Tensor:
        B, T = self.ids.shape
        slots = torch.arange(T, device=self.ids.device).expand(B, T)
        embeds = self.model.embed(self.ids, self.feats)
        mask = causal_padding_mask(self.mask)
        hidden = self.model.language_model(embeds, self.prompt_positions, mask, self.cache, slots, T)
        return self.model.logits(hidden[:, -1])  # (B, V)

    def step(self, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """new (B,) tokens just chosen; mask (B, S) now includes them."""
        B = new.shape[0]
        self.positions = self.positions + 1
        slot = torch.full((B, 1), self.length, device=new.device)
        self.length += 1
        keys = mask.bool()[:, None, None, :]  # (B, 1, 1, S): the new token sees every real key
        embeds = _embed_generated(self.model, new)
        hidden = self.model.language_model(embeds, self.positions, keys, self.cache, slot, self.length)
        return self.model.logits(hidden[:, -1])
