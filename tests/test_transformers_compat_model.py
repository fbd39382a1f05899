"""``FastVLM``'s model surface against transformers' ``FastVlmForConditionalGeneration``.

The calls transformers' FastVLM docs and model tests make (tests/models/fast_vlm/
test_modeling_fast_vlm.py and the ``ModelTesterMixin`` checks that apply: inputs_embeds,
embedding getters and setters, config attributes, get_image_features, attn_implementation,
device_map, dtype), each on the same tiny random weights with transformers as the oracle.
Logits agree to 1e-5 of the largest logit (float32).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import builders
from fastvlm import FastVLM, SpeedOptions
from fastvlm.device import resolve_dtype
from fastvlm.errors import InputError

torch.set_grad_enabled(False)
TOL = 1e-5
N_IMG = (builders.IMAGE_SIZE // 64) ** 2
IMAGE_ID = builders.SMALL_IMAGE_TOKEN_ID


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref = builders.build_reference(seed=21)
    return builders.save_reference(ref, tmp_path_factory.mktemp("compat_model")), ref


@pytest.fixture(scope="module")
def pair(saved):
    folder, ref = saved
    return FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False), ref


@pytest.fixture(scope="module")
def batch():
    """Two prompts with one image each, the second left-padded by 3."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 900, (2, 12), generator=g)
    ids[:, 4 : 4 + N_IMG] = IMAGE_ID
    mask = torch.ones(2, 12, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    px = torch.rand(2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px}


# ---- forward --------------------------------------------------------------------------------


def test_inputs_embeds_with_and_without_pixels(pair, batch):
    # ModelTesterMixin.test_inputs_embeds / test_inputs_embeds_matches_input_ids
    ours, ref = pair
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    embeds = ref.get_input_embeddings()(ids)
    assert torch.equal(ours.get_input_embeddings()(ids), embeds)
    got = ours(inputs_embeds=embeds, attention_mask=mask, pixel_values=px).logits
    expected = ref(inputs_embeds=embeds, attention_mask=mask, pixel_values=px).logits
    assert rel_diff(got, expected) <= TOL
    assert rel_diff(got, ours(**batch).logits) <= TOL  # the same as from ids
    text = torch.randint(3, 900, (2, 7))
    got = ours(inputs_embeds=ref.get_input_embeddings()(text)).logits
    assert rel_diff(got, ref(inputs_embeds=ref.get_input_embeddings()(text)).logits) <= TOL


def test_ids_and_embeds_together_are_refused(pair, batch):
    ours, ref = pair
    embeds = ref.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError):
        ref(input_ids=batch["input_ids"], inputs_embeds=embeds)
    with pytest.raises(InputError, match="exactly one of input_ids or inputs_embeds"):
        ours(input_ids=batch["input_ids"], inputs_embeds=embeds)


@pytest.mark.slow
def test_output_object_and_tuple(pair, batch):
    ours, ref = pair
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_ID, -100)
    got, expected = ours(**batch, labels=labels), ref(**batch, labels=labels)
    assert got.keys() == ["loss", "logits", "image_hidden_states"]
    assert [k for k in expected.keys() if k != "past_key_values"] == got.keys()
    assert rel_diff(got["logits"], expected["logits"]) <= TOL
    assert rel_diff(got[0], expected[0]) <= TOL  # the loss comes first when labels are given
    assert rel_diff(got.image_hidden_states, expected.image_hidden_states) <= TOL
    as_tuple = ours(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_diff(as_tuple[0], ref(**batch, return_dict=False)[0]) <= TOL


def test_logits_to_keep(pair, batch):
    # ModelTesterMixin / GenerationTesterMixin: logits_to_keep
    ours, ref = pair
    for keep in (1, 3, torch.tensor([0, 5, 11])):
        got, expected = ours(**batch, logits_to_keep=keep).logits, ref(**batch, logits_to_keep=keep).logits
        assert got.shape == expected.shape and rel_diff(got, expected) <= TOL


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"output_attentions": True}, "output_attentions"),
        ({"output_hidden_states": True}, "output_hidden_states"),
        ({"use_cache": True}, "use_cache"),
        ({"vision_feature_layer": -2}, "vision_feature_layer"),
        ({"token_type_ids": None}, "'token_type_ids'"),
    ],
)
def test_unsupported_forward_arguments_fail_in_one_line(pair, batch, kwargs, words):
    ours, _ = pair
    with pytest.raises(InputError, match=words) as info:
        ours(**batch, **kwargs)
    assert "\n" not in str(info.value)


def test_false_flags_are_accepted(pair, batch):
    ours, ref = pair
    flags = {"use_cache": False, "output_attentions": False, "vision_feature_select_strategy": "full"}
    assert rel_diff(ours(**batch, **flags).logits, ref(**batch).logits) <= TOL


# ---- pieces ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_get_image_features_returns_transformers_output(pair, batch):
    # FastVlmModelTest: get_image_features
    ours, ref = pair
    px = batch["pixel_values"]
    got, expected = ours.get_image_features(px), ref.get_image_features(px)
    assert got.pooler_output.shape == expected.pooler_output.shape
    assert rel_diff(got.pooler_output, expected.pooler_output) <= TOL
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    assert rel_diff(got.last_hidden_state, expected.last_hidden_state) <= TOL
    assert torch.equal(ours.encode_images(px), got.pooler_output)


def test_embedding_getters_and_setters(saved, batch):
    # ModelTesterMixin.test_model_get_set_embeddings
    folder, ref = saved
    for speed in (SpeedOptions(), SpeedOptions.off()):  # the fast default keeps lm_head transposed
        ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False, speed=speed)
        assert torch.equal(ours.get_output_embeddings().weight, ref.get_output_embeddings().weight)
        assert isinstance(ours.get_input_embeddings(), nn.Embedding)
    g = torch.Generator().manual_seed(4)
    table = nn.Embedding(1024, 64, _weight=torch.randn(1024, 64, generator=g))
    head = nn.Linear(64, 1024, bias=False)
    head.weight.data = torch.randn(1024, 64, generator=g)
    ref = builders.build_reference(seed=21)  # a fresh copy: the setters change it
    ours.set_input_embeddings(table)
    ref.set_input_embeddings(table)
    ours.set_output_embeddings(head)
    ref.lm_head = head  # transformers has no set_output_embeddings on this class; the attribute is it
    assert ours.get_input_embeddings() is table and ours.get_output_embeddings() is head
    unpadded = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    assert rel_diff(ours(**unpadded).logits, ref(**unpadded).logits) <= TOL


def test_config_views_have_transformers_names(pair):
    ours, ref = pair
    text_names = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_dropout",
        "use_sliding_window",
        "max_window_layers",
        "model_type",
    ]
    for name in text_names:
        assert getattr(ours.config.text_config, name) == getattr(ref.config.text_config, name), name
    for name in ("hidden_size", "architecture", "model_type"):
        assert getattr(ours.config.vision_config, name) == getattr(ref.config.vision_config, name), name
    top = [
        "image_token_id",
        "image_token_index",
        "image_seq_length",
        "projector_hidden_act",
        "multimodal_projector_bias",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "tie_word_embeddings",
    ]
    for name in top:
        assert getattr(ours.config, name) == getattr(ref.config, name), name


# ---- from_pretrained: dtype, device_map, attn_implementation, other arguments -------------------


@pytest.fixture(scope="module")
def bf16_folder(saved, tmp_path_factory):
    """The checkpoint saved in bfloat16 (config.json says so)."""
    folder = tmp_path_factory.mktemp("bf16")
    ref = builders.build_reference(seed=21).to(torch.bfloat16)
    return builders.save_reference(ref, folder)


def test_dtype_auto_is_the_checkpoint_dtype(bf16_folder, tmp_path):
    from transformers import FastVlmForConditionalGeneration

    expected = FastVlmForConditionalGeneration.from_pretrained(bf16_folder, dtype="auto").dtype
    assert expected == torch.bfloat16
    for kwargs in ({}, {"dtype": "auto"}, {"torch_dtype": "auto"}):
        model = FastVLM.from_pretrained(bf16_folder, device="cpu", progress=False, **kwargs)
        assert model.dtype == expected, kwargs
    # Without dtype in config.json, transformers (and we) read the weights' dtype.
    bare = tmp_path / "bare"
    shutil.copytree(bf16_folder, bare)
    config = json.loads((bare / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
        config["text_config"].pop(key, None)
    (bare / "config.json").write_text(json.dumps(config))
    assert FastVlmForConditionalGeneration.from_pretrained(bare, dtype="auto").dtype == torch.bfloat16
    assert FastVLM.from_pretrained(bare, device="cpu", progress=False).dtype == torch.bfloat16
    assert FastVLM.from_pretrained(bare, torch_dtype=torch.float32, progress=False).dtype == torch.float32


@pytest.mark.slow
def test_load_keeps_the_device_aware_dtype(tiny_checkpoint_dir, tmp_path):
    import fastvlm

    folder = tmp_path / "bf16_config"
    shutil.copytree(tiny_checkpoint_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert FastVLM.from_pretrained(folder, device="cpu", progress=False).dtype == torch.bfloat16
    vlm = fastvlm.load(folder, device="cpu", dtype="auto", progress=False, max_batch=1)
    assert vlm.model.dtype == resolve_dtype("auto", torch.device("cpu"))


def test_device_map_places_the_whole_model(saved):
    folder, _ = saved
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    for device_map, where in [
        ("auto", auto),
        ("cpu", "cpu"),
        ({"": "cpu"}, "cpu"),
        (torch.device("cpu"), "cpu"),
    ]:
        model = FastVLM.from_pretrained(folder, device_map=device_map, dtype=torch.float32, progress=False)
        assert model.device.type == where and {p.device.type for p in model.parameters()} == {where}
    for device_map, words in [
        ({"vision_tower": "cpu", "language_model": "cuda:1"}, "splits the model"),
        ("balanced", "splits the model"),
    ]:
        with pytest.raises(InputError, match=words):
            FastVLM.from_pretrained(folder, device_map=device_map, progress=False)


@pytest.fixture(scope="module")
def eager_ref(saved):
    from transformers import FastVlmForConditionalGeneration

    folder, _ = saved
    return FastVlmForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.slow
def test_eager_sdpa_and_transformers_agree(saved, eager_ref, batch, monkeypatch):
    # Padding positions attend to nothing; each implementation fills them differently.
    real = batch["attention_mask"].bool()

    def rel_diff(ours, ref):
        return float((ours - ref)[real].abs().max() / ref[real].abs().max())

    folder, ref = saved
    eager = FastVLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32, progress=False)
    sdpa = FastVLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32, progress=False)
    assert {layer.self_attn.implementation for layer in eager.language_model.layers} == {"eager"}
    expected = ref(**batch).logits
    assert rel_diff(eager_ref(**batch).logits, expected) <= TOL
    # The eager path really is eager: no SDPA call anywhere in the model.
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", _no_sdpa)
        got_eager = eager(**batch).logits
    assert rel_diff(got_eager, eager_ref(**batch).logits) <= TOL
    assert rel_diff(sdpa(**batch).logits, expected) <= TOL
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    assert torch.equal(eager.generate(**batch, **kwargs), eager_ref.generate(**batch, **kwargs))


def _no_sdpa(*args, **kwargs):
    raise AssertionError("SDPA was called on the eager path")


@pytest.mark.slow
def test_flash_attention_for_the_text_model_falls_back_once(saved, batch):
    folder, ref = saved
    with pytest.warns(UserWarning, match="flash_attention_2 for the decoder: .*; using SDPA"):
        model = FastVLM.from_pretrained(
            folder,
            attn_implementation={"text_config": "flash_attention_2"},
            dtype=torch.float32,
            progress=False,
        )
    assert rel_diff(model(**batch).logits, ref(**batch).logits) <= TOL


def test_flash_attention_for_the_whole_model_is_refused(saved):
    from transformers import FastVlmForConditionalGeneration

    folder, _ = saved
    with pytest.raises((ValueError, ImportError)):
        FastVlmForConditionalGeneration.from_pretrained(folder, attn_implementation="flash_attention_2")
    with pytest.raises(InputError, match="vision tower") as info:
        FastVLM.from_pretrained(folder, attn_implementation="flash_attention_2", progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"attn_implementation": "flex_attention"}, "flex_attention"),
        ({"attn_implementation": {"vision_config": "flash_attention_2"}}, "vision"),
        ({"quantization_config": {"load_in_8bit": True}}, "'quantization_config'.*int8"),
        ({"subfolder": "x"}, "'subfolder'"),
        ({"dtype": torch.float32, "torch_dtype": torch.bfloat16}, "not both"),
        ({"device": "cpu", "device_map": "cuda"}, "disagree"),
    ],
)
def test_unsupported_from_pretrained_arguments_fail_in_one_line(saved, kwargs, words):
    folder, _ = saved
    with pytest.raises(InputError, match=words) as info:
        FastVLM.from_pretrained(folder, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_harmless_transformers_arguments_are_accepted(saved):
    folder, _ = saved
    model = FastVLM.from_pretrained(
        folder, trust_remote_code=True, low_cpu_mem_usage=True, use_safetensors=True, progress=False
    )
    assert model.dtype == torch.float32


def test_attention_kernels_are_speed_options(saved, batch):
    # attn_implementation maps onto SpeedOptions(attention=..., vision_attention=...).
    from fastvlm.errors import FastVLMError
    from fastvlm.models.optimize import optimize

    folder, ref = saved
    model = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False, speed=SpeedOptions.off())
    optimize(model, SpeedOptions(attention="eager", vision_attention="eager"))
    assert model.vision_tower.stages[-1].blocks[0].token_mixer.implementation == "eager"
    real = batch["attention_mask"].bool()
    got, expected = model(**batch).logits[real], ref(**batch).logits[real]
    assert rel_diff(got, expected) <= TOL
    with pytest.raises(FastVLMError, match="'flash'"):
        optimize(model, SpeedOptions(attention="flash"))
