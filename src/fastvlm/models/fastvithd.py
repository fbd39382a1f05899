"""FastViTHD, the hybrid conv/attention image encoder, in its fused (inference) form.

Module and parameter names follow timm's ``fastvit_mci3`` in ``inference_mode`` so a
fused checkpoint maps onto this module by a prefix rename. Training-form checkpoints
(multi-branch MobileOne / RepMixer / RepCPE weights) are fused into these shapes by
``fastvlm.checkpoints`` before loading; nothing here knows about branches.

Input (B, 3, S, S) in [0, 1]; output (B, num_features, S/64, S/64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    # timm's symmetric "same-ish" padding for odd kernels is k // 2 for every stride used here.
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class InplaceGELU(nn.Module):
    """Exact GELU written over its input: at 1024x1024 each early activation is ~50 MB,
    and the input is always a fresh conv output that nothing else reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(x)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        rd = max(1, int(channels * rd_ratio + 0.5))  # timm make_divisible(divisor=1, round_limit=0)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ReparamConv(nn.Module):
    """A fused MobileOne block or large-kernel conv: conv (+ squeeze-excite) (+ GELU)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        se: float | None = None,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.reparam_conv = _conv(cin, cout, k, stride, groups)
        self.se = SqueezeExcite(cout, se) if se else nn.Identity()
        self.act = InplaceGELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.reparam_conv(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (its BatchNorm folded in at load time), then 1x1 -> GELU -> 1x1."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = _conv(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = InplaceGELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class FusedDepthwise(nn.Module):
    """One depthwise conv with bias: the fused form of two different training-time blocks.

    RepMixer, x + gamma * (mixer(x) - norm(x)), and the conditional positional encoding
    RepCPE, x + dwconv(x), are both linear and depthwise, so each folds into this.
    """

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.reparam_conv = _conv(dim, dim, k, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reparam_conv(x)


RepMixer = RepCPE = FusedDepthwise


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig, mlp_ratio: float) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, cfg.repmixer_kernel_size)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions; no qkv bias."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.implementation = "sdpa"  # or "eager": explicit matmuls, as timm without fused attention
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        if self.implementation == "eager":
            x = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # (B, nh, N, hd)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        return x.transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=cfg.norm_eps)
        self.token_mixer = Attention(dim, cfg.head_dim)
        self.layer_scale_1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Downsampling: grouped large-kernel strided conv, then a 1x1 MobileOne block."""

    def __init__(self, cin: int, cout: int, cfg: VisionConfig, se: bool) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamConv(
                cin,
                cout,
                cfg.down_patch_size,
                cfg.down_stride,
                groups=cin,
                se=0.25 if se else None,
                act=cfg.lkc_use_act,
            ),
            ReparamConv(cout, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Stage(nn.Module):
    def __init__(self, i: int, cin: int, cfg: VisionConfig, downsample: bool) -> None:
        super().__init__()
        dim = cfg.embed_dims[i]
        self.downsample = PatchEmbed(cin, dim, cfg, cfg.se_downsamples[i]) if downsample else nn.Identity()
        k = cfg.pos_embs[i]
        self.pos_emb = RepCPE(dim, k) if k else nn.Identity()
        block = RepMixerBlock if cfg.token_mixers[i] == "repmixer" else AttentionBlock
        self.blocks = nn.Sequential(*(block(dim, cfg, cfg.mlp_ratios[i]) for _ in range(cfg.layers[i])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class FastViTHD(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        d0 = cfg.embed_dims[0]
        self.stem = nn.Sequential(
            ReparamConv(cfg.in_chans, d0, 3, stride=2),
            ReparamConv(d0, d0, 3, stride=2, groups=d0),
            ReparamConv(d0, d0, 1),
        )
        stages, cin = [], d0
        for i, down in enumerate(cfg.stage_downsamples()):
            stages.append(Stage(i, cin, cfg, down))
            cin = cfg.embed_dims[i]
        self.stages = nn.Sequential(*stages)
        # group_size=1 in timm: one group per input channel, two outputs each.
        self.final_conv = ReparamConv(cin, cfg.num_features, 3, groups=cin, se=1 / 16)
        # Speed switches, set only by ``models.optimize``; off, the tower is the plain reference.
        self.channels_last = False  # NHWC pixels into NHWC weights (oneDNN and cuDNN favour it)
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None  # ``features``, compiled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, num_features, S/64, S/64)."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return (self.compiled or self.features)(pixel_values)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The eager forward (what ``compiled`` compiles)."""
        return self.final_conv(self.stages(self.stem(pixel_values)))

    def extra_repr(self) -> str:
        return f"channels_last={self.channels_last}, compiled={self.compiled is not None}"
