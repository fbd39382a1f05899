"""Structural re-parameterisation as pure tensor functions.

Training-form FastViT blocks sum several linear branches (conv+BN, 1x1 conv+BN,
identity BN) before a non-linearity. Since every branch is linear in the input, the
sum equals one conv whose kernel is the sum of the branch kernels (each BN folded
in, smaller kernels zero-padded to the centre). RepVGG (arXiv:2101.03697) and
MobileOne (arXiv:2206.04040) give the derivation.

All functions take and return float tensors; call them in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BatchNorm:
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float = 1e-5

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BN(x) = x * scale + shift, per channel."""
        scale = self.weight / (self.running_var + self.eps).sqrt()
        return scale, self.bias - self.running_mean * scale


Kernel = tuple[torch.Tensor, torch.Tensor]  # (weight (Cout, Cin/groups, k, k), bias (Cout,))


def fuse_conv_bn(weight: torch.Tensor, bn: BatchNorm) -> Kernel:
    """conv(no bias) -> BN  ==  conv with these weight and bias."""
    scale, shift = bn.scale_shift()
    return weight * scale.reshape(-1, 1, 1, 1), shift


def identity_kernel(channels: int, in_per_group: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """A (channels, in_per_group, k, k) kernel that copies each channel through unchanged."""
    w = torch.zeros(channels, in_per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    w[idx, idx % in_per_group, k // 2, k // 2] = 1
    return w


def fuse_identity_bn(bn: BatchNorm, in_per_group: int, k: int) -> Kernel:
    return fuse_conv_bn(identity_kernel(bn.weight.shape[0], in_per_group, k, bn.weight), bn)


def pad_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a centred kernel to k x k."""
    p = (k - weight.shape[-1]) // 2
    return F.pad(weight, [p, p, p, p])


def add_kernels(parts: list[Kernel], k: int) -> Kernel:
    weight = sum(pad_kernel(w, k) for w, _ in parts)
    bias = sum(b for _, b in parts)
    return weight, bias


def fuse_mobileone(
    convs: list[tuple[torch.Tensor, BatchNorm]],
    scale: tuple[torch.Tensor, BatchNorm] | None,
    identity: BatchNorm | None,
    k: int,
    in_per_group: int,
) -> Kernel:
    """MobileOne block: sum of k x k conv+BN branches, a 1x1 conv+BN branch and an identity BN."""
    parts = [fuse_conv_bn(w, bn) for w, bn in convs]
    if scale is not None:
        parts.append(fuse_conv_bn(*scale))
    if identity is not None:
        parts.append(fuse_identity_bn(identity, in_per_group, k))
    return add_kernels(parts, k)


def fuse_repmixer(mixer: Kernel, norm: Kernel, gamma: torch.Tensor | None) -> Kernel:
    """RepMixer x + gamma * (mixer(x) - norm(x)) with depthwise fused mixer/norm convs."""
    (wm, bm), (wn, bn) = mixer, norm
    ident = identity_kernel(wm.shape[0], 1, wm.shape[-1], wm)
    if gamma is None:
        return ident + wm - wn, bm - bn
    g = gamma.reshape(-1)
    return ident + g.reshape(-1, 1, 1, 1) * (wm - wn), g * (bm - bn)


def fuse_repcpe(weight: torch.Tensor, bias: torch.Tensor) -> Kernel:
    """Conditional positional encoding x + dwconv(x) as one depthwise conv."""
    return weight + identity_kernel(weight.shape[0], weight.shape[1], weight.shape[-1], weight), bias
