"""What ``generate(..., return_dict_in_generate=True)`` returns, shaped like transformers'
``GenerateDecoderOnlyOutput`` / ``GenerateBeamDecoderOnlyOutput``.

Like transformers' ``ModelOutput``: fields read as attributes or keys, unset (None)
fields are not keys, and an integer index walks the set fields in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.outputs import ModelOutput as _Output


@dataclass
class GenerateDecoderOnlyOutput(_Output):
    """Greedy or sampled generation. ``scores``: processed (B, V) scores per new token;
    ``logits``: the raw ones. Attentions, hidden states and the cache are never returned."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(_Output):
    """Beam search. ``sequences_scores``: each returned sequence's length-penalised log
    probability (with ``output_scores``); ``scores``: the processed (B * num_beams, V)
    log-probabilities per step; ``beam_indices``: which beam each token came from."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: None = None
