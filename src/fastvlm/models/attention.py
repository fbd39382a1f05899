"""Multi-token attention kernels of the decoder, chosen by name as transformers names them.

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (the default).
* ``"eager"``: plain matmuls and a float32 softmax, as transformers' ``eager_attention_forward``;
  the slow reference the others are tested against.
* ``"flash_attention_2"``: the flash-attn package's kernel, for unpadded half-precision
  batches on CUDA; anything else (a padding mask, float32, no flash-attn) runs SDPA.

Every kernel takes q (B, nh, T, hd), k and v (B, nkv, S, hd) and a boolean "may attend"
mask (B, 1, T, S), or None for plain causal attention, and returns (B, nh, T, hd).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1)  # (B, nkv, S, hd) -> (B, nh, S, hd)


def sdpa(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def eager(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    T, S, hd = q.shape[2], k.shape[2], q.shape[3]
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5  # (B, nh, T, S)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # top-left aligned, as SDPA
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs @ v  # (B, nh, T, hd)


def flash(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    usable = mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] > 1
    if not usable or not flash_attn_available():
        return sdpa(q, k, v, mask, dropout)
    from flash_attn import flash_attn_func

    # flash-attn wants (B, T, heads, hd) and handles grouped key/value heads itself.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, causal=True)
    return out.transpose(1, 2)  # (B, T, nh, hd) -> (B, nh, T, hd)


_KERNELS = {"sdpa": sdpa, "eager": eager, "flash_attention_2": flash}


def attend(implementation: str, q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    return _KERNELS[implementation](q, k, v, mask, dropout)
