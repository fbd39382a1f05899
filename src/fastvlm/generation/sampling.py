"""Next-token selection as pure functions of logits, settings and a generator.

Nothing here knows about models, caches or text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError

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

    def __post_init__(self) -> None:
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


def sample_next(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> int:
    """Pick one token id from a (V,) logits row."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(logits.float().argmax())  # float32: see sample_rows
    probs = filter_logits(logits, p).softmax(-1)
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


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[torch.Tensor | None],
    *,
    allowed: list[torch.Tensor | None] | None = None,
) -> tuple[list[int], dict[int, Exception]]:
    """One token per row of (B, V) logits, each row with its own settings.

    Returns the tokens and the rows that failed (row -> error; their token is -1): a
    row whose scores are not finite, or whose sampling raised, fails alone.
    ``allowed`` holds a (V,) bool mask per constrained row (None for the others, or
    None for all): tokens outside it get -inf (see ``apply_allowed``).

    Rows that are greedy without a repetition penalty share one batched argmax, so an
    all-greedy batch costs one device sync. Every other row goes through
    ``sample_next``, which makes a row's token independent of its batch neighbours.
    """
    # float32 first: the exact same answer, and CPU's bfloat16 argmax over a 150k-entry
    # vocabulary is ~5x slower than the cast plus a float32 argmax.
    scores = logits.float()
    # The finiteness check reads the model's scores, before the mask adds its -inf.
    masked = scores if allowed is None else apply_allowed(scores, allowed)
    both = torch.stack([masked.argmax(-1), torch.isfinite(scores).all(-1).long()])  # (2, B): one sync
    picked, finite = both.tolist()
    failed: dict[int, Exception] = {}
    for b, p in enumerate(params):
        row = logits[b] if allowed is None or allowed[b] is None else masked[b]
        try:
            if not finite[b]:
                raise NonFiniteLogitsError("the model's scores for this request hold NaN or inf")
            if not p.greedy or (p.repetition_penalty != 1.0 and seen[b] is not None):
                picked[b] = sample_next(row, p, generators[b], seen[b])
        except Exception as exc:  # this row's failure must not end its neighbours
            picked[b], failed[b] = -1, exc
    return picked, failed
