"""Every fast path against the plain model it was made from."""

from __future__ import annotations

import copy

import pytest
import torch

import builders
from fastvlm import FastVLM
from fastvlm.models.optimize import SpeedOptions, optimize

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    ref = builders.build_reference(seed=11)
    folder = builders.save_reference(ref, tmp_path_factory.mktemp("opt"))
    return FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    px = torch.rand(1, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    ids = torch.randint(3, 900, (1, 12), generator=g)
    ids[0, 2:6] = builders.SMALL_IMAGE_TOKEN_ID
    return ids, px


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_fused_projections_and_channels_last_equal_plain(plain, inputs):
    ids, px = inputs
    fast = optimize(copy.deepcopy(plain), SpeedOptions(fuse_projections=True, channels_last=True))
    assert hasattr(fast.language_model.layers[0].self_attn, "qkv_proj")
    assert _rel(fast.get_image_features(px), plain.get_image_features(px)) <= 1e-5
    assert _rel(fast(ids, pixel_values=px).logits, plain(ids, pixel_values=px).logits) <= 1e-5
    kwargs = {"input_ids": ids, "pixel_values": px, "max_new_tokens": 10}
    assert fast.generate(**kwargs).tolist() == plain.generate(**kwargs).tolist()


def test_transposed_float32_layout_equals_plain(plain, inputs):
    from fastvlm.models.optimize import TransposedLinear

    ids, px = inputs
    fast = optimize(copy.deepcopy(plain), SpeedOptions(fuse_projections=False, channels_last=False))
    assert isinstance(fast.lm_head, TransposedLinear)
    optimize(fast, SpeedOptions())  # applying again is harmless
    assert _rel(fast(ids, pixel_values=px).logits, plain(ids, pixel_values=px).logits) <= 1e-5
    kwargs = {"input_ids": ids, "pixel_values": px, "max_new_tokens": 8}
    assert fast.generate(**kwargs).tolist() == plain.generate(**kwargs).tolist()


def test_all_switches_off_is_identity(plain, inputs):
    ids, px = inputs
    same = optimize(copy.deepcopy(plain), SpeedOptions.off())
    assert torch.equal(same(ids, pixel_values=px).logits, plain(ids, pixel_values=px).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_weights_stay_close(plain, inputs, dtype):
    ids, px = inputs
    base = copy.deepcopy(plain).to(dtype)
    quant = optimize(copy.deepcopy(base), SpeedOptions(int8=True))
    assert quant.lm_head.qweight.dtype == torch.int8
    # Weight-only int8 with per-channel scales: a few percent of the logit range at most.
    assert _rel(quant(ids, pixel_values=px).logits, base(ids, pixel_values=px).logits) <= 0.05


def test_compiled_vision_tower_matches_eager(plain, inputs):
    _, px = inputs
    fast = optimize(copy.deepcopy(plain), SpeedOptions(compile_vision=True))
    got = fast.get_image_features(px)
    assert not fast.vision_forward.failed, "torch.compile fell back to eager"
    assert fast.vision_forward.compile_seconds is not None
    assert _rel(got, plain.get_image_features(px)) <= 1e-4


def test_int8_prefill_path_matches_decode_path(plain, inputs):
    from fastvlm.models.optimize import Int8Linear

    ids, px = inputs
    quant = optimize(copy.deepcopy(plain).to(torch.bfloat16), SpeedOptions(int8=True))
    packed = quant(ids, pixel_values=px).logits
    Int8Linear.packed_max_rows = 0  # force the dequantise + dense matmul path
    try:
        dense = quant(ids, pixel_values=px).logits
    finally:
        Int8Linear.packed_max_rows = 16
    assert _rel(dense, packed) <= 0.02


def test_loading_does_not_import_sympy(tiny_checkpoint_dir):
    # Random init on the meta device imports sympy, ~80 MB resident for nothing;
    # a fresh interpreter shows whether loading and optimising still pull it in.
    import subprocess
    import sys

    code = (
        "import sys, fastvlm\n"
        "from fastvlm.models.optimize import optimize\n"
        f"optimize(fastvlm.FastVLM.from_pretrained({str(tiny_checkpoint_dir)!r}, progress=False))\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
