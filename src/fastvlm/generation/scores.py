"""Score adjustments beside the repetition penalty, and the log-probabilities reported.

Pure functions of one row's scores (V,) and a request's settings: OpenAI's
``logit_bias`` and presence/frequency penalties, and the log-softmax that
``logprobs`` report. ``sampling`` calls them in its fixed order (see its docstring).
Nothing here knows about models, caches or text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import InputError

PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's bounds for presence_penalty and frequency_penalty
BIAS_RANGE = (-100.0, 100.0)  # OpenAI's bounds for logit_bias values
MAX_TOP_LOGPROBS = 20


def check_penalty(name: str, value: object) -> None:
    low, high = PENALTY_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    if not low <= value <= high:
        raise InputError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def normalize_logit_bias(bias: object) -> dict[int, float] | None:
    """``{token id: bias}`` with int ids and float values in BIAS_RANGE; None or {} -> None.

    Ids may come as digit strings, as JSON object keys do.
    """
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise InputError(f"logit_bias must map token ids to numbers, not {type(bias).__name__}")
    out: dict[int, float] = {}
    low, high = BIAS_RANGE
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise InputError(f"logit_bias keys must be token ids (integers >= 0), not {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"logit_bias[{key}] must be a number, not {value!r}")
        if not low <= value <= high:
            raise InputError(f"logit_bias[{key}] must be in [{low:g}, {high:g}], got {value!r}")
        out[key] = float(value)
    return out or None


def check_logit_bias_ids(bias: Mapping[int, float] | None, vocab_size: int) -> None:
    """A biased id the model has no score for would fail inside a step: refuse it up front."""
    if bias and max(bias) >= vocab_size:
        raise InputError(
            f"logit_bias names token id {max(bias)}, but this model's ids are 0..{vocab_size - 1}"
        )


def apply_logit_bias(scores: torch.Tensor, bias: Mapping[int, float] | None) -> torch.Tensor:
    """Add ``bias[id]`` to ``scores[id]``; scores (V,) float32."""
    if not bias:
        return scores
    ids = torch.tensor(list(bias), dtype=torch.long, device=scores.device)  # (K,)
    values = torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)  # (K,)
    return scores.index_add(-1, ids, values)


def new_counts(vocab_size: int, device: torch.device) -> torch.Tensor:
    """Per-token counts of one sequence's generated ids, for presence/frequency penalties."""
    return torch.zeros(vocab_size, dtype=torch.float32, device=device)  # (V,)


def apply_presence_frequency(
    scores: torch.Tensor, counts: torch.Tensor | None, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: ``scores -= presence * (count > 0) + frequency * count``.

    ``counts`` (V,) counts the generated tokens only, never the prompt's.
    """
    if counts is None or (presence == 0.0 and frequency == 0.0):
        return scores
    penalty = counts * frequency + (counts > 0).to(scores.dtype) * presence  # (V,)
    return scores - penalty


@dataclass
class RowLogprobs:
    """The chosen token's log-probability and the ``k`` most likely tokens' (best first)."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def logprob_temperature(temperature: float) -> float:
    """Sampled rows report the distribution after temperature; greedy rows (T=0) use T=1."""
    return temperature if temperature >= 1e-5 else 1.0


def row_logprobs(scores: torch.Tensor, temperature: float, token: int, k: int) -> RowLogprobs:
    """Log-softmax of processed ``scores`` (V,) at ``temperature``, before any truncation.

    Entries at -inf (masked tokens) are left out of the top list: they were never possible.
    """
    logp = (scores.float() / logprob_temperature(temperature)).log_softmax(-1)  # (V,)
    values, ids = logp.topk(k)  # (k,) each, best first
    # One device sync for all of it; float64 holds every id (< 2**53) exactly.
    flat = torch.cat([logp[token].view(1).double(), values.double(), ids.double()]).tolist()
    top = [(int(i), v) for v, i in zip(flat[1 : 1 + k], flat[1 + k :], strict=True) if v != -math.inf]
    return RowLogprobs(token, flat[0], [i for i, _ in top], [v for _, v in top])
