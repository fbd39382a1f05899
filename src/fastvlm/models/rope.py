"""Rotary-embedding frequencies for the RoPE types we honour: default, linear and YaRN.

All three are static (the frequencies do not depend on the sequence being run), so
they are computed once per forward from the config's ``rope_parameters`` and the cache
stays valid across steps. ``dynamic`` NTK scaling recomputes frequencies as a sequence
grows, which a cache filled at other frequencies cannot follow; ``fastvlm.config``
refuses it and the other types. The formulas are those of transformers'
``modeling_rope_utils`` (YaRN: Peng et al. 2023, https://arxiv.org/abs/2309.00071).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _base_frequencies(head_dim: int, theta: float, device: torch.device | None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / theta**exponent  # (hd/2,)


def _yarn_scale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: torch.Tensor, head_dim: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Interpolate the slow dimensions by ``factor``, keep the fast ones, ramp in between."""
    theta, factor = p["rope_theta"], p["factor"]
    original = p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, device=inv_freq.device).float() - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (fast dims), 0: interpolate (slow dims)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    scale = p.get("attention_factor")
    if scale is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        scale = (
            _yarn_scale(factor, mscale) / _yarn_scale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_scale(factor)
        )
    return inv_freq, float(scale)


def rope_frequencies(
    head_dim: int, params: dict[str, Any], device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq (hd/2,), scale applied to cos and sin) for standardised ``rope_parameters``."""
    inv_freq = _base_frequencies(head_dim, params["rope_theta"], device)
    kind = params.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, params)
    return inv_freq, 1.0
