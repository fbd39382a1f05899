"""Every fast path against the plain model it was made from."""

from __future__ import annotations

import copy

import pytest
import torch

import builders
from fastvlm import FastVLM
from fastvlm.models.optimize import SpeedOptions, optimize
from fastvlm.models.qwen2 import Attention, FusedAttention, FusedMLP

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    ref = builders.build_reference(seed=11)
    folder = builders.save_reference(ref, tmp_path_factory.mktemp("opt"))
    return FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False, speed=SpeedOptions.off())


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
    layer = fast.language_model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert fast.vision_tower.channels_last
    assert _rel(fast.encode_images(px), plain.encode_images(px)) <= 1e-5
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


@pytest.mark.slow
def test_compiled_vision_tower_matches_eager(plain, inputs):
    _, px = inputs
    fast = optimize(copy.deepcopy(plain), SpeedOptions(compile_vision=True))
    got = fast.encode_images(px)
    compiled = fast.vision_tower.compiled
    assert not compiled.failed, f"torch.compile fell back to eager: {compiled.failed}"
    assert compiled.compile_seconds is not None
    assert _rel(got, plain.encode_images(px)) <= 1e-4


def test_int8_prefill_path_matches_decode_path(plain, inputs):
    from fastvlm.models.quantize import Int8Linear, quantize_int8

    ids, px = inputs
    base = copy.deepcopy(plain).to(torch.bfloat16)
    quant = optimize(copy.deepcopy(base), SpeedOptions(int8=True))
    packed = quant(ids, pixel_values=px).logits
    dense = copy.deepcopy(base)
    quantize_int8(dense, packed_max_rows=0)  # every call takes the dequantise + dense matmul path
    assert isinstance(dense.lm_head, Int8Linear) and "packed_max_rows=0" in repr(dense.lm_head)
    assert _rel(dense(ids, pixel_values=px).logits, packed) <= 0.02


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_weights_stay_close(plain, inputs, dtype):
    from fastvlm.models.quantize import Int4Linear

    ids, px = inputs
    base = copy.deepcopy(plain).to(dtype)
    quant = optimize(copy.deepcopy(base), SpeedOptions(int4=True))
    assert isinstance(quant.lm_head, Int4Linear)
    assert isinstance(quant.language_model.layers[0].mlp.gate_up_proj.linear, Int4Linear)
    got = quant(ids, pixel_values=px).logits
    # The kernels against the same model with each int4 layer dequantised into a plain one.
    dense = copy.deepcopy(quant)
    for module in list(dense.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int4Linear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.dequantized().to(dtype)
                if child.bias is not None:
                    linear.bias.data = child.bias.data
                setattr(module, name, linear)
    assert _rel(got, dense(ids, pixel_values=px).logits) <= (0.03 if dtype == torch.bfloat16 else 1e-4)
    # 16 levels per group on random Gaussian weights: a coarse but bounded change.
    assert _rel(got, base(ids, pixel_values=px).logits) <= 0.3


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_kernel_matches_its_dequantized_weight(rows):
    from fastvlm.models.quantize import Int4Linear

    g = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(192, 128, bias=True)
    linear.weight.data = torch.randn(128, 192, generator=g) * 0.05
    quant = Int4Linear(linear.to(torch.bfloat16), group_size=64)
    weight = quant.dequantized()  # (N, K), float32
    # Round to nearest: each weight is off by at most half a step of its group.
    step = quant.scale_offset[..., 0].float().t().repeat_interleave(64, dim=1)  # (N, K)
    assert bool(((weight - linear.weight.float()).abs() <= step / 2 + 1e-3).all())
    x = torch.randn(rows, 192, generator=g).to(torch.bfloat16)
    eager = torch.nn.functional.linear(x.float(), weight, linear.bias.float())
    assert _rel(quant(x), eager) <= 0.02
    dense = Int4Linear(linear.to(torch.bfloat16), group_size=64, kernel_max_rows=0)  # dequantise + matmul
    assert torch.equal(dense.packed, quant.packed)
    assert _rel(dense(x), eager) <= 0.02
    strided = torch.randn(192, rows, generator=g).to(torch.bfloat16).t()  # (rows, 192), not contiguous
    assert (
        _rel(quant(strided), torch.nn.functional.linear(strided.float(), weight, linear.bias.float())) <= 0.02
    )


@pytest.mark.parametrize("cls", ["Int8Linear", "Int4Linear"])
def test_quantising_in_row_chunks_spans_chunk_edges(cls):
    from fastvlm.models import quantize

    linear = torch.nn.Linear(64, 4096 + 192, bias=False)  # two chunks of rows
    linear.weight.data = torch.randn(4096 + 192, 64, generator=torch.Generator().manual_seed(1))
    quant = quantize.Int8Linear(linear) if cls == "Int8Linear" else quantize.Int4Linear(linear, 32)
    if cls == "Int8Linear":
        weight = quant.qweight.float() * quant.scale.float()[:, None]
        step = quant.scale.float()[:, None]
    else:
        weight = quant.dequantized()
        step = quant.scale_offset[..., 0].float().t().repeat_interleave(32, dim=1)
    assert bool(((weight - linear.weight).abs() <= step / 2 + 1e-6).all())


def test_int4_unpack_reads_the_kernel_layout():
    from fastvlm.models.quantize import unpack_int4

    q = torch.randint(0, 16, (192, 256), generator=torch.Generator().manual_seed(2)).int()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_int4(packed, 192, 256).int(), q)


def test_impossible_options_are_refused_before_any_change(plain):
    from fastvlm.errors import FastVLMError

    model = copy.deepcopy(plain)
    with pytest.raises(FastVLMError, match="int8 or int4"):
        optimize(model, SpeedOptions(int8=True, int4=True))
    assert type(model.language_model.layers[0].self_attn) is Attention  # not fused
    # float32's default optimisation transposes the weights that quantising would replace.
    optimize(model)
    with pytest.raises(FastVLMError, match="freshly loaded"):
        optimize(model, SpeedOptions(int4=True))


@pytest.mark.slow
def test_loading_does_not_import_sympy(tiny_checkpoint_dir):
    # Random init on the meta device imports sympy, ~80 MB resident for nothing;
    # a fresh interpreter shows whether loading and optimising still pull it in.
    import subprocess
    import sys

    code = (
        "import sys, fastvlm\n"
        f"fastvlm.FastVLM.from_pretrained({str(tiny_checkpoint_dir)!r}, progress=False)\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_switch_shows_in_repr(plain):
    text = repr(plain)
    assert "FusedAttention" not in text and "channels_last=False, compiled=False" in text
    fast = optimize(copy.deepcopy(plain), SpeedOptions(compile_vision=True))
    text = repr(fast)
    assert "(self_attn): FusedAttention(" in text and "(mlp): FusedMLP(" in text
    assert "channels_last=True, compiled=True" in text and "TransposedLinear(" in text
    assert repr(optimize(fast, SpeedOptions(compile_vision=True))) == text  # applying again changes nothing


def test_from_pretrained_is_fast_by_default_and_plain_when_asked(tiny_checkpoint_dir):
    fast = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype=torch.bfloat16, progress=False)
    assert isinstance(fast.language_model.layers[0].self_attn, FusedAttention)
    assert fast.vision_tower.channels_last
    plain = FastVLM.from_pretrained(
        tiny_checkpoint_dir, dtype=torch.bfloat16, progress=False, speed=SpeedOptions.off()
    )
    assert type(plain.language_model.layers[0].self_attn) is Attention
    assert not plain.vision_tower.channels_last and plain.source == str(tiny_checkpoint_dir)


def _compiled_raising(monkeypatch, error: BaseException):
    from fastvlm.models import optimize as optimize_module

    def fake_compile(fn, **kwargs):
        def run(x):
            raise error

        return run

    monkeypatch.setattr(optimize_module.torch, "compile", fake_compile)
    return optimize_module.CompiledWithFallback(lambda x: x + 1)


def test_compile_failure_falls_back_once_and_says_why(monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    compiled = _compiled_raising(monkeypatch, InvalidCxxCompiler())
    x = torch.zeros(2)
    with pytest.warns(UserWarning, match="torch.compile failed .InvalidCxxCompiler: No working C.. compiler"):
        assert torch.equal(compiled(x), x + 1)
    assert compiled.failed.startswith("InvalidCxxCompiler")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next call is quietly eager
        assert torch.equal(compiled(x), x + 1)


def test_other_errors_in_a_compiled_call_are_not_hidden(monkeypatch):
    compiled = _compiled_raising(monkeypatch, MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        compiled(torch.zeros(2))
    assert compiled.failed is None
