"""Next-token selection as pure functions of logits, settings and a generator.

Each row's scores go through a fixed order:

    logits (as float32) -> grammar mask -> logit_bias -> repetition_penalty
    -> presence/frequency penalties -> greedy argmax, or temperature -> top_k -> top_p
    -> min_p -> sample

The grammar mask (-inf outside a constrained row's allowed tokens) comes first here,
which gives the same scores as applying it after the bias and the penalties: each maps
-inf to -inf and leaves the allowed entries as they would be anyway.

Reported log-probabilities (``logprobs``) are the log-softmax of the scores after the
grammar mask, the bias and the penalties, divided by the temperature when the row
samples (T > 0; a greedy row uses T = 1), and before top-k/top-p/min-p truncation: the
distribution the truncation then cuts from. Nothing here knows about models, caches or text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .scores import (
    RowLogprobs,
    apply_logit_bias,
    apply_presence_frequency,
    check_penalty,
    normalize_logit_bias,
    row_logprobs,
)

# Sane ranges. Outside them the scores overflow or underflow float32 within a few
# steps (a penalty of 1e-38 divides a logit up to inf), and no useful setting lies there.
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class NonFiniteLogitsError(RuntimeError):
    """A row's scores became NaN or infinite; only that request fails."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy; at most MAX_TEMPERATURE
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 means off; within REPETITION_PENALTY_RANGE
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]; counts generated tokens only
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]; counts generated tokens only
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)  # id -> [-100, 100]

    def __post_init__(self) -> None:
        _check_openai_extras(self)
        low, high = REPETITION_PENALTY_RANGE
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, not {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                and (name == "top_k" or value is not None)
            ):
                raise InputError(f"{name} must be an integer, not {value!r}")
        checks = [
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", low <= self.repetition_penalty <= high, f"in [{low:g}, {high:g}]"),
            ("seed", self.seed is None or _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1], "a 64-bit integer"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def counts_tokens(self) -> bool:
        """Whether a presence or frequency penalty needs the generated tokens' counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check_openai_extras(p: SamplingParams) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        check_penalty(name, getattr(p, name))
    # Frozen: a private copy, so a caller mutating its dict later changes nothing here.
    object.__setattr__(p, "logit_bias", normalize_logit_bias(p.logit_bias))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens in ``seen`` (1D ids), as transformers applies it."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking (masked entries become -inf). logits (V,)"""
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; always keep the first.
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def row_scores(
    logits: torch.Tensor,
    p: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """A (V,) logits row as float32 after logit_bias and the penalties, in that order."""
    # float32 first: the exact same argmax, and CPU's bfloat16 argmax over a 150k-entry
    # vocabulary is ~5x slower than the cast plus a float32 argmax.
    scores = apply_logit_bias(logits.float(), p.logit_bias)
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, p.repetition_penalty)
    return apply_presence_frequency(scores, counts, p.presence_penalty, p.frequency_penalty)


def sample_next(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> int:
    """Pick one token id from a (V,) logits row (``counts``: generated-token counts, (V,))."""
    scores = row_scores(logits, p, seen, counts)
    if p.greedy:
        return int(scores.argmax())
    probs = filter_logits(scores, p).softmax(-1)
    # Checked here, not left to multinomial: on CUDA a bad distribution is a device
    # assert that breaks every later step, not an exception.
    if not bool(torch.isfinite(probs).all()):
        raise NonFiniteLogitsError("the sampling distribution holds NaN or inf")
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_allowed(scores: torch.Tensor, allowed: list[torch.Tensor | None]) -> torch.Tensor:
    """(B, V) float32 ``scores`` with -inf outside each constrained row's allowed set.

    ``allowed[b]`` is a (V,) bool mask (True = allowed) or None for a free row. Done
    before the penalties, which is the same as after: they map -inf to -inf and leave
    the allowed entries as they would be anyway.
    """
    rows = [b for b, mask in enumerate(allowed) if mask is not None]
    keep = torch.stack([allowed[b] for b in rows]).to(scores.device, non_blocking=True).float()  # (n, V)
    # score + (keep - 1) / keep is score where keep is 1 and -inf where it is 0, exactly;
    # on CPU it is ~3x faster than masked_fill, whose cost grows with a scattered mask.
    if len(rows) == scores.shape[0]:
        return torch.addcdiv(scores, keep - 1, keep)
    out = scores.clone()
    out[rows] = torch.addcdiv(scores[rows], keep - 1, keep)
    return out


def _own_pass(p: SamplingParams, seen: torch.Tensor | None, counts: torch.Tensor | None) -> bool:
    """Whether a row needs more than the shared batched argmax."""
    penalized = p.repetition_penalty != 1.0 and seen is not None
    return not p.greedy or penalized or bool(p.logit_bias) or (counts is not None and p.counts_tokens)


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[torch.Tensor | None],
    *,
    counts: list[torch.Tensor | None] | None = None,
    top_logprobs: list[int | None] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
) -> tuple[list[int], dict[int, Exception], dict[int, RowLogprobs]]:
    """One token per row of (B, V) logits, each row with its own settings.

    ``counts`` holds a row's generated-token counts when it has a presence or frequency
    penalty; ``top_logprobs[b]`` is how many alternatives row b reports (None: no
    logprobs); ``allowed`` holds a (V,) bool mask per constrained row (None for the
    others, or None for all): tokens outside it get -inf (see ``apply_allowed``).
    Returns the tokens, the rows that failed (row -> error; their token is -1) and the
    log-probabilities of the rows that asked. A row whose scores are not finite, or
    whose sampling raised, fails alone.

    Rows that are greedy without bias, penalties or logprobs share one batched argmax,
    so an all-greedy batch costs one device sync. Every other row goes through
    ``sample_next``, which makes a row's token independent of its batch neighbours.
    """
    B = len(params)
    counts = counts or [None] * B
    top_logprobs = top_logprobs or [None] * B
    scores = logits.float()
    # The finiteness check reads the model's scores, before the mask adds its -inf.
    masked = scores if allowed is None else apply_allowed(scores, allowed)
    both = torch.stack([masked.argmax(-1), torch.isfinite(scores).all(-1).long()])  # (2, B): one sync
    picked, finite = both.tolist()
    failed: dict[int, Exception] = {}
    logprobs: dict[int, RowLogprobs] = {}
    for b, p in enumerate(params):
        row = logits[b] if allowed is None or allowed[b] is None else masked[b]
        try:
            if not finite[b]:
                raise NonFiniteLogitsError("the model's scores for this request hold NaN or inf")
            if _own_pass(p, seen[b], counts[b]) or top_logprobs[b] is not None:
                picked[b] = sample_next(row, p, generators[b], seen[b], counts[b])
            if top_logprobs[b] is not None:
                logprobs[b] = _logprobs(row, p, seen[b], counts[b], picked[b], top_logprobs[b])
        except Exception as exc:  # this row's failure must not end its neighbours
            picked[b], failed[b] = -1, exc
            logprobs.pop(b, None)
    return picked, failed, logprobs


def _logprobs(
    logits: torch.Tensor,
    p: SamplingParams,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
    token: int,
    k: int,
) -> RowLogprobs:
    """What ``logprobs`` report for one row: its scores again (only rows that ask pay)."""
    return row_logprobs(row_scores(logits, p, seen, counts), p.temperature, token, k)
