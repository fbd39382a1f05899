"""Every config.json field we read is honoured (same logits as transformers) or refused in one line.

Honoured fields are checked by building transformers' FastVlmForConditionalGeneration with
the field changed, saving it, loading it with ours and comparing logits (float32, <= 1e-5
of the largest logit). Refused fields are checked by writing them into a saved checkpoint's
config.json and expecting one ``CheckpointError`` line that names the field.

| field (fast_vlm; Apple's flat llava_qwen2 config: text fields at the top) | status |
|---|---|
| text_config.hidden_act (silu, gelu, gelu_pytorch_tanh, gelu_new, relu, ...) | honoured; unknown: refused |
| text_config.rope_parameters / rope_scaling: default, linear, yarn | honoured |
| rope types dynamic, longrope, llama3, ...; partial_rotary_factor != 1 | refused |
| text_config.rope_theta (absent: 10000, as transformers) | honoured |
| use_sliding_window, sliding_window, max_window_layers, layer_types | honoured if inert, else refused |
| text_config.rms_norm_eps, num_key_value_heads (null = heads), head_dim | honoured |
| text_config.attention_dropout | honoured (training mode only, as transformers) |
| tie_word_embeddings (either level) | honoured |
| attention_bias | not read by Qwen2: q/k/v bias always, as transformers |
| projector_hidden_act, multimodal_projector_bias | honoured |
| vision_feature_select_strategy != "full", vision_feature_layer != -1 | refused (as transformers) |
| vision_config.architecture != fastvit_mci3, unknown model_args, fork_feat | refused |
| vision_config.hidden_size / mm_hidden_size != the tower's width | refused |
| vision_config.model_args (tower shape), pretrained_cfg.input_size | honoured (test_model_parity.py) |
| image_token_index | honoured |
| dtype / torch_dtype | from_pretrained(dtype="auto") (test_transformers_compat_model.py) |
| mm_projector_type != mlp2x_gelu, mm_vision_tower != mobileclip_l_<size> (Apple) | refused |

A sliding window is inert when it covers max_position_embeddings. A checkpoint without
the q/k/v biases is refused as an incomplete checkpoint (missing weight).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import builders
from fastvlm import FastVLM, SpeedOptions
from fastvlm.config import FastVLMConfig
from fastvlm.config_rules import rope_parameters
from fastvlm.errors import CheckpointError
from fastvlm.models.activations import ACTIVATIONS

torch.set_grad_enabled(False)
TOL = 1e-5
N_IMG = (builders.IMAGE_SIZE // 64) ** 2


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def inputs(image_id: int = builders.SMALL_IMAGE_TOKEN_ID) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 900, (2, 14), generator=g)
    ids[:, 2 : 2 + N_IMG] = image_id
    px = torch.rand(2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "pixel_values": px}


def assert_parity(tmp_path, speed=None, image_id=builders.SMALL_IMAGE_TOKEN_ID, **build) -> None:
    """Build the reference with ``build`` changes, load it with ours, compare logits."""
    ref = builders.build_reference(seed=3, image_token_id=image_id, **build)
    folder = builders.save_reference(ref, tmp_path / "ckpt")
    for options in [SpeedOptions(), SpeedOptions.off()] if speed is None else [speed]:
        ours = FastVLM.from_pretrained(
            folder, dtype=torch.float32, device="cpu", progress=False, speed=options
        )
        batch = inputs(image_id)
        assert rel_diff(ours(**batch).logits, ref(**batch).logits) <= TOL


# ---- honoured: parity with transformers ---------------------------------------------------------


def test_activation_table_matches_transformers():
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_hidden_act_is_honoured(tmp_path, act):
    assert_parity(tmp_path, text_overrides={"hidden_act": act})


def test_projector_act_and_bias_are_honoured(tmp_path):
    overrides = {"projector_hidden_act": "gelu_pytorch_tanh", "multimodal_projector_bias": False}
    assert_parity(tmp_path, speed=SpeedOptions(), overrides=overrides)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 3.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 2.0, "beta_fast": 8, "beta_slow": 2, "attention_factor": 1.3},
    ],
    ids=["linear", "yarn", "yarn-explicit"],
)
@pytest.mark.slow
def test_static_rope_types_are_honoured(tmp_path, rope):
    params = {"rope_theta": 1e4, **rope}
    assert_parity(tmp_path, speed=SpeedOptions(), text_overrides={"rope_parameters": params})


def test_yarn_generates_the_same_tokens(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
    ref = builders.build_reference(seed=3, text_overrides={"rope_parameters": rope})
    folder = builders.save_reference(ref, tmp_path / "ckpt")
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    batch = inputs()
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    assert torch.equal(ours.generate(**batch, **kwargs), ref.generate(**batch, **kwargs))


def test_legacy_rope_scaling_key_and_default_theta():
    from transformers import Qwen2Config

    assert rope_parameters({"rope_scaling": {"type": "linear", "factor": 2.0}})["rope_type"] == "linear"
    # No theta anywhere: transformers' default, not Qwen2's published 1e6.
    assert rope_parameters({})["rope_theta"] == Qwen2Config(num_hidden_layers=1).rope_parameters["rope_theta"]


@pytest.mark.parametrize(
    "text",
    [
        {"rms_norm_eps": 0.3},
        {"num_key_value_heads": 1},
        {"num_key_value_heads": None},
        {"head_dim": 32},
        {"attention_dropout": 0.5},  # eval mode: no effect, in both
        {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1},  # covers 4096 positions
    ],
    ids=["rms_eps", "mqa", "kv-null", "head_dim", "dropout", "inert-window"],
)
def test_text_fields_are_honoured(tmp_path, text):
    assert_parity(tmp_path, speed=SpeedOptions(), text_overrides=text)


@pytest.mark.slow
def test_tied_embeddings_and_image_token_are_honoured(tmp_path):
    assert_parity(tmp_path, tied=True, image_id=7)


def test_apple_flat_config_honours_hidden_act(tmp_path):
    ref = builders.build_reference(seed=3, vocab=builders.REAL_VOCAB, text_overrides={"hidden_act": "gelu"})
    folder = builders.save_apple(ref, tmp_path / "apple")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    ids = inputs(builders.IMAGE_TOKEN_ID)
    expected = ref(**ids).logits
    assert rel_diff(ours(**ids).logits, expected) <= TOL


@pytest.mark.slow
def test_attention_dropout_applies_in_training_mode_only(tmp_path):
    ref = builders.build_reference(seed=3, text_overrides={"attention_dropout": 0.5})
    folder = builders.save_reference(ref, tmp_path / "ckpt")
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    batch = inputs()
    evaluated = ours(**batch).logits
    ours.train()
    torch.manual_seed(0)
    assert not torch.allclose(ours(**batch).logits, evaluated)
    ours.eval()
    assert torch.equal(ours(**batch).logits, evaluated)


# ---- refused: one line naming the field ------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref = builders.build_reference(seed=3)
    return builders.save_reference(ref, tmp_path_factory.mktemp("audit"))


def edited(saved, tmp_path, edit) -> str:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def text(**fields):
    return lambda c: c["text_config"].update(fields)


def sliding(window: int):
    def edit(config):
        # Without layer_types transformers derives them from the window settings.
        config["text_config"].pop("layer_types", None)
        config["text_config"].update(use_sliding_window=True, sliding_window=window, max_window_layers=1)

    return edit


def top(**fields):
    return lambda c: c.update(fields)


def model_args(**fields):
    return lambda c: c["vision_config"]["model_args"].update(fields)


REFUSED = [
    (text(hidden_act="gelu_10"), "hidden_act 'gelu_10'"),
    (top(projector_hidden_act="leaky_relu"), "projector_hidden_act 'leaky_relu'"),
    (text(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), "rope type 'dynamic'"),
    (text(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6}), "rope type 'longrope'"),
    (text(rope_scaling={"type": "llama3", "factor": 8.0}), "rope type 'llama3'"),
    (text(rope_parameters={"rope_type": "linear", "rope_theta": 1e6}), "needs a factor"),
    (text(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (sliding(16), "sliding-window attention"),
    (text(layer_types=["full_attention", "chunked_attention"]), "layer type"),
    (top(vision_feature_layer=-2), "vision_feature_layer"),
    (lambda c: c["vision_config"].update(architecture="fastvit_mci2"), "fastvit_mci2"),
    (lambda c: c["vision_config"].update(hidden_size=99), "hidden_size is 99"),
    (model_args(act_layer="relu"), "act_layer"),
    (model_args(fork_feat=True), "fork_feat"),
]


@pytest.mark.parametrize("edit, words", REFUSED, ids=[w for _, w in REFUSED])
def test_refused_fields_fail_in_one_line(saved, tmp_path, edit, words):
    folder = edited(saved, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_transformers_loads_what_we_refuse_for_sliding_window(saved, tmp_path):
    # The refusal is ours, not a broken config: transformers builds this model.
    from transformers import FastVlmConfig

    folder = edited(saved, tmp_path, sliding(16))
    config = FastVlmConfig.from_pretrained(folder)
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]


def test_apple_refusals(tmp_path):
    base = {"model_type": "llava_qwen2", "mm_vision_tower": "mobileclip_l_1024", "num_hidden_layers": 2}
    for bad, words in [
        ({"mm_projector_type": "linear"}, "mlp2x_gelu"),
        ({"mm_hidden_size": 1000}, "mm_hidden_size is 1000"),
        ({"hidden_act": "nope"}, None),  # read here, refused when the model is built
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ]:
        if words is None:
            assert FastVLMConfig.from_dict({**base, **bad}).text.hidden_act == "nope"
            continue
        with pytest.raises(CheckpointError, match=words):
            FastVLMConfig.from_dict({**base, **bad})
