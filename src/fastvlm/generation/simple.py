"""transformers-style ``generate``: prompt in, prompt + new tokens out.

This is the call behind ``FastVLM.generate``. It takes transformers' arguments
(``GenerationConfig`` fields, ``generation_config``, ``logits_processor``,
``stopping_criteria``, ``inputs_embeds``) with transformers' defaults and precedence,
and gives the same tokens as ``FastVlmForConditionalGeneration.generate`` on the same
weights: greedy, sampling (same seed, same draws), and beam search (``beam.py``).
With ``use_cache=False`` every step recomputes the whole sequence: slow, but the plain
reference that the cached path (and the batching engine) are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .beam import beam_search
from .decoders import CachedDecoder, UncachedDecoder, generation_positions
from .generation_config import GenerationConfig, resolve_generation_config
from .outputs import GenerateDecoderOnlyOutput
from .plan import Plan, make_plan

__all__ = ["generate", "generation_positions"]


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | Any = None,
    logits_processor: Sequence | None = None,
    stopping_criteria: Sequence | None = None,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> torch.Tensor | Any:
    """Generate from a (left-padded) batch of prompts.

    ``kwargs`` are GenerationConfig fields (``max_new_tokens``, ``do_sample``,
    ``num_beams``, ...); an option we do not implement raises one InputError naming it.
    ``generator`` (our addition) seeds sampling without touching the global RNG.
    Returns the sequences, or a ``Generate*Output`` with ``return_dict_in_generate``.
    """
    cfg, set_by = resolve_generation_config(model, generation_config, **kwargs)
    plan = make_plan(
        model, cfg, set_by, input_ids, pixel_values, attention_mask, inputs_embeds,
        logits_processor, stopping_criteria,
    )  # fmt: skip
    if plan.max_new_tokens == 0:
        return _wrap(plan, plan.ids, (), ())
    decoder_cls = CachedDecoder if plan.cfg.use_cache else UncachedDecoder
    decoder = decoder_cls(model, plan.embeds, plan.mask, plan.max_new_tokens)
    if plan.cfg.num_beams > 1:
        return beam_search(decoder, plan, generator)
    return _sample(decoder, plan, generator)


def _sample(decoder, plan: Plan, generator: torch.Generator | None):
    """Greedy (argmax) or multinomial sampling, one token per row per step."""
    cfg, ids, mask = plan.cfg, plan.ids, plan.mask
    logits = decoder.prefill()  # (B, V)
    copies = cfg.num_return_sequences
    if copies > 1:  # each prompt row becomes `copies` adjacent rows, as transformers expands them
        rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(copies)
        decoder.reorder(rows)
        ids, mask, logits = ids[rows], mask[rows], logits[rows]
    B = ids.shape[0]
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    scores_seen: list[torch.Tensor] = []
    logits_seen: list[torch.Tensor] = []
    while True:
        raw = logits.float()
        scores = plan.processors(ids, raw)
        if cfg.return_dict_in_generate:
            if want_scores:
                scores_seen.append(scores)
            if cfg.output_logits:
                logits_seen.append(raw)
        if cfg.do_sample:
            new = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            new = scores.argmax(-1)
        if plan.eos_ids and plan.pad_id is not None:
            new = torch.where(unfinished, new, torch.full_like(new, plan.pad_id))
        ids = torch.cat([ids, new[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        unfinished &= ~plan.stopper(ids, tuple(scores_seen) if want_scores else None)
        if not bool(unfinished.any()):
            break
        logits = decoder.step(new, mask)
    return _wrap(plan, ids, scores_seen, logits_seen)


def _wrap(plan: Plan, ids: torch.Tensor, scores: Sequence, logits: Sequence):
    cfg = plan.cfg
    if not cfg.return_dict_in_generate:
        return ids
    return GenerateDecoderOnlyOutput(
        sequences=ids,
        scores=tuple(scores) if cfg.output_scores else None,
        logits=tuple(logits) if cfg.output_logits else None,
    )
