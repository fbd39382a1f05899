"""Rewrite training-form vision weights into the fused tensors our modules hold.

Works on a lazy state dict (name -> function returning the tensor) in our module
names, so nothing is read from disk until the loader asks for it. Each rule finds
a group of branch tensors by name, removes them and adds the fused weight and bias.
The ConvFFN BatchNorm is folded into its conv for every checkpoint, fused or not.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache, partial

import torch

from ..errors import CheckpointError
from ..models import reparam
from ..models.reparam import BatchNorm, Kernel

Lazy = Callable[[], torch.Tensor]
LazyState = dict[str, Lazy]


def _pop(state: LazyState, key: str) -> torch.Tensor:
    # A branch with one of its tensors absent (a truncated or hand-edited checkpoint).
    if key not in state:
        raise CheckpointError(f"checkpoint is missing weight {key!r}; is it a complete FastVLM checkpoint?")
    return state.pop(key)().float()


def _pop_bn(state: LazyState, prefix: str) -> BatchNorm:
    state.pop(prefix + "num_batches_tracked", None)
    return BatchNorm(*(_pop(state, prefix + n) for n in ("weight", "bias", "running_mean", "running_var")))


def _prefixes(state: LazyState, pattern: str) -> list[str]:
    """Distinct group prefixes: the text before ``pattern`` in matching keys."""
    rx = re.compile(r"^(.*?\.)" + pattern)
    return sorted({m.group(1) for k in state if (m := rx.match(k))})


def _put(state: LazyState, prefix: str, make: Callable[[], Kernel]) -> None:
    fused = cache(make)  # weight and bias come from one computation
    state[prefix + "weight"] = lambda: fused()[0]
    state[prefix + "bias"] = lambda: fused()[1]


def _mobileone(state: LazyState, p: str, k: int | None = None, in_per_group: int | None = None) -> Kernel:
    """Pop a MobileOne block's branches under prefix ``p`` and fuse them."""
    convs = []
    i = 0
    while p + f"conv_kxk.{i}.conv.weight" in state:
        convs.append((_pop(state, p + f"conv_kxk.{i}.conv.weight"), _pop_bn(state, p + f"conv_kxk.{i}.bn.")))
        i += 1
    scale = None
    if p + "conv_scale.conv.weight" in state:
        scale = (_pop(state, p + "conv_scale.conv.weight"), _pop_bn(state, p + "conv_scale.bn."))
    identity = _pop_bn(state, p + "identity.") if p + "identity.weight" in state else None
    if convs:
        k, in_per_group = convs[0][0].shape[-1], convs[0][0].shape[1]
    elif scale is not None and k is None:
        k, in_per_group = 1, scale[0].shape[1]
    return reparam.fuse_mobileone(convs, scale, identity, k, in_per_group)


def _repmixer(group: LazyState, p: str) -> Kernel:
    mixer = _mobileone(group, p + "mixer.")
    norm = _mobileone(group, p + "norm.", k=mixer[0].shape[-1], in_per_group=1)
    gamma = _pop(group, p + "layer_scale.gamma") if p + "layer_scale.gamma" in group else None
    return reparam.fuse_repmixer(mixer, norm, gamma)


def _large_kernel(group: LazyState, p: str) -> Kernel:
    parts = [
        reparam.fuse_conv_bn(_pop(group, p + "large_conv.conv.weight"), _pop_bn(group, p + "large_conv.bn."))
    ]
    if p + "small_conv.conv.weight" in group:
        small = _pop(group, p + "small_conv.conv.weight"), _pop_bn(group, p + "small_conv.bn.")
        parts.append(reparam.fuse_conv_bn(*small))
    return reparam.add_kernels(parts, parts[0][0].shape[-1])


def _repcpe(group: LazyState, p: str) -> Kernel:
    return reparam.fuse_repcpe(_pop(group, p + "pos_enc.weight"), _pop(group, p + "pos_enc.bias"))


def _ffn_conv(group: LazyState, p: str) -> Kernel:
    return reparam.fuse_conv_bn(_pop(group, p + "conv.conv.weight"), _pop_bn(group, p + "conv.bn."))


# (key pattern that marks a group, branch names the group owns, fusion, name of the fused conv).
# Order matters: RepMixer owns MobileOne sub-blocks, so it runs before the plain MobileOne rule.
_RULES = [
    (r"mixer\.conv_kxk\.0\.conv\.weight$", ("mixer.", "norm.", "layer_scale."), _repmixer, "reparam_conv."),
    (r"large_conv\.conv\.weight$", ("large_conv.", "small_conv."), _large_kernel, "reparam_conv."),
    (r"pos_enc\.weight$", ("pos_enc.",), _repcpe, "reparam_conv."),
    (
        r"(conv_kxk\.0\.conv|conv_scale\.conv|identity)\.weight$",
        ("conv_kxk.", "conv_scale.", "identity."),
        _mobileone,
        "reparam_conv.",
    ),
    (r"conv\.bn\.weight$", ("conv.",), _ffn_conv, "conv."),
]


def _take(state: LazyState, prefix: str, parts: tuple[str, ...] = ("",)) -> LazyState:
    """Move every entry under ``prefix + part`` out of ``state`` into a private dict."""
    keys = [k for k in state if any(k.startswith(prefix + part) for part in parts)]
    return {k: state.pop(k) for k in keys}


def fuse_vision_state(state: LazyState, prefix: str = "vision_tower.") -> LazyState:
    """Fuse all training-form groups under ``prefix`` in place; returns ``state``."""
    vision = _take(state, prefix)
    for pattern, branches, fuse, fused_name in _RULES:
        for p in _prefixes(vision, pattern):
            group = _take(vision, p, branches)
            _put(vision, p + fused_name, partial(fuse, group, p))
    state.update(vision)
    return state
