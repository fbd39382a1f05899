"""Fused blocks equal their multi-branch training form (timm's modules as the oracle).

Each case checks the fused block's output against the training-form block's, and the
fused weight and bias themselves against timm's own ``reparameterize()``: a bias error
that the output tolerance would hide still fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models import fastvit as tf

import builders
from fastvlm.checkpoints.fusion import fuse_vision_state
from fastvlm.models import fastvithd as ours

torch.set_grad_enabled(False)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    builders._randomize_(module, seed=0)
    return module.eval()


def _fused_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    lazy = {"vision_tower." + k: (lambda v=v: v) for k, v in module.state_dict().items()}
    return {k.removeprefix("vision_tower."): f() for k, f in fuse_vision_state(lazy).items()}


def _assert_same_fused_tensors(ours: dict[str, torch.Tensor], timm_fused: torch.nn.Module) -> None:
    """Every tensor timm's reparameterize() produced equals ours, the conv bias included."""
    theirs = {k: v for k, v in timm_fused.state_dict().items() if "reparam_conv." in k}
    assert {k.rsplit(".", 1)[1] for k in theirs} == {"weight", "bias"}
    for name, tensor in theirs.items():
        torch.testing.assert_close(
            ours[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: n + ": " + m
        )


def _check(reference: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> None:
    state = _fused_state(reference)
    fused.load_state_dict(state)
    expected, got = reference(x), fused.eval()(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    timm_fused = copy.deepcopy(reference)
    timm_fused.reparameterize()
    _assert_same_fused_tensors(state, timm_fused)


@pytest.mark.parametrize("k,groups,stride", [(3, 1, 2), (3, 8, 2), (1, 1, 1), (3, 8, 1)])
def test_mobileone_block(k, groups, stride):
    ref = _randomize(tf.MobileOneBlock(8, 8, k, stride=stride, group_size=0 if groups == 1 else 1))
    _check(ref, ours.ReparamConv(8, 8, k, stride=stride, groups=groups), torch.randn(2, 8, 12, 12))


def test_mobileone_with_squeeze_excite():
    ref = _randomize(tf.MobileOneBlock(8, 16, 3, group_size=1, use_se=True, num_conv_branches=1))
    _check(ref, ours.ReparamConv(8, 16, 3, groups=8, se=1 / 16), torch.randn(2, 8, 6, 6))


def test_large_kernel_conv():
    ref = _randomize(
        tf.ReparamLargeKernelConv(8, 16, 7, 2, group_size=1, small_kernel=3, act_layer=torch.nn.GELU)
    )
    _check(ref, ours.ReparamConv(8, 16, 7, stride=2, groups=8), torch.randn(2, 8, 16, 16))


def test_repmixer():
    ref = _randomize(tf.RepMixer(8, kernel_size=3))
    _check(ref, ours.RepMixer(8, 3), torch.randn(2, 8, 10, 10))


def test_repcpe():
    ref = _randomize(tf.RepConditionalPosEnc(8, spatial_shape=(7, 7)))
    _check(ref, ours.RepCPE(8, 7), torch.randn(2, 8, 9, 9))


def test_timm_reparameterize_agrees_with_ours():
    """Our fusion of a whole block equals timm's own reparameterize(), weight and bias."""
    block = _randomize(tf.RepMixerBlock(16, kernel_size=3, mlp_ratio=2))
    fused = _fused_state(block)
    block.token_mixer.reparameterize()
    _assert_same_fused_tensors(fused, block)
    # The ConvFFN's BatchNorm, which timm never folds, folded by hand.
    bn = block.mlp.conv.bn
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    conv = block.mlp.conv.conv.weight
    torch.testing.assert_close(fused["mlp.conv.weight"], conv * scale[:, None, None, None])  # (C, 1, k, k)
    torch.testing.assert_close(fused["mlp.conv.bias"], bn.bias - bn.running_mean * scale)
