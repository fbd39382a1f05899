"""Ports of transformers' FastVLM model tests, run on the model tester's own tiny config.

Sources: tests/models/fast_vlm/test_modeling_fast_vlm.py (``FastVlmVisionText2TextModelTester``,
``FastVlmForConditionalGenerationModelTest``) and the ``ModelTesterMixin`` checks of
tests/test_modeling_common.py that apply to a model without attention or hidden-state
outputs. transformers' ``FastVlmForConditionalGeneration`` on the same weights is the
oracle wherever the original only checked shapes. Each test names its original.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastvlm import FastVLM
from fastvlm.errors import FastVLMError
from ported_tester import (
    BATCH_SIZE,
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    PAD_TOKEN_ID,
    SEQ_LENGTH,
    TEXT_CONFIG,
    build_pair,
    inputs_for_common,
)

torch.set_grad_enabled(False)
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("ported_modeling"))


def logits_of(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


def assert_close_where(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Positions whose own token is masked differ by design (transformers lets such a query
    see no key at all, we let it see itself), so only real positions are compared."""
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)


def test_forward_matches_the_reference(pair):
    """The tester's forward on prepare_config_and_inputs_for_common (what every ModelTesterMixin
    check starts from): logits of shape (batch, seq, vocab), here equal to transformers'."""
    inputs = inputs_for_common()
    got = logits_of(pair.ours, inputs)
    assert got.shape == (BATCH_SIZE, SEQ_LENGTH, TEXT_CONFIG["vocab_size"])
    assert_close_where(got, logits_of(pair.ref, inputs), inputs["attention_mask"])


def test_mismatching_num_image_tokens(pair):
    """FastVlmForConditionalGenerationModelTest.test_mismatching_num_image_tokens."""
    inputs = copy.deepcopy(inputs_for_common())
    pair.ours(**inputs)  # successful forward with no modifications
    # remove one image but leave all the image tokens in text
    inputs["pixel_values"] = inputs["pixel_values"][-2:, ...]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        pair.ours(**inputs)
    # two images and one set of image tokens raise an error
    input_ids = inputs["input_ids"][:1]
    pixel_values = torch.cat([inputs["pixel_values"][:1]] * 2, dim=0)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        pair.ours(input_ids=input_ids, pixel_values=pixel_values)
    # two images and two sets of image tokens don't raise an error
    pair.ours(input_ids=torch.cat([input_ids, input_ids], dim=0), pixel_values=pixel_values)


def test_determinism(pair):
    """ModelTesterMixin.test_determinism: two forwards give the same logits."""
    inputs = inputs_for_common()
    assert torch.equal(logits_of(pair.ours, inputs), logits_of(pair.ours, inputs))


def test_batching_equivalence(pair):
    """ModelTesterMixin.test_batching_equivalence: each row alone gives what it gives in the batch."""
    inputs = inputs_for_common()
    batched = logits_of(pair.ours, inputs)
    for row in range(BATCH_SIZE):
        single = logits_of(pair.ours, {k: v[row : row + 1] for k, v in inputs.items()})
        assert_close_where(single[0], batched[row], inputs["attention_mask"][row])


def test_training_loss(pair):
    """ModelTesterMixin.test_training: a forward with labels returns the causal-LM loss
    (transformers' value; -100 labels ignored)."""
    inputs = inputs_for_common()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    got = pair.ours(**inputs, labels=labels).loss
    expected = pair.ref(**inputs, labels=labels).loss
    assert got.ndim == 0 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_save_load(pair, tmp_path):
    """ModelTesterMixin.test_save_load / test_can_use_safetensors: save_pretrained writes
    safetensors that both libraries load back to the same outputs."""
    from transformers import FastVlmForConditionalGeneration

    pair.ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    inputs = inputs_for_common()
    expected = logits_of(pair.ours, inputs)
    again = FastVLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    torch.testing.assert_close(logits_of(again, inputs), expected, atol=0, rtol=0)
    theirs = FastVlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_close_where(logits_of(theirs, inputs), expected, inputs["attention_mask"])


def test_config_common_properties(pair):
    """FastVlmForConditionalGenerationModelTest.test_config (ConfigTester with
    common_properties=["image_token_id"]) and the sub-config views transformers code reads."""
    ours, ref = pair.ours.config, pair.ref.config
    assert ours.image_token_id == ref.image_token_id == IMAGE_TOKEN_ID
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert getattr(ours.text_config, name) == getattr(ref.text_config, name), name
    assert ours.vision_config.hidden_size == ref.vision_config.hidden_size


def test_model_get_set_embeddings(pair, tmp_path):
    """ModelTesterMixin.test_model_get_set_embeddings."""
    model = FastVLM.from_pretrained(pair.folder, dtype=torch.float32, progress=False)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    new = nn.Embedding(10, 10)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new
    head = model.get_output_embeddings()
    assert head is None or isinstance(head, nn.Module) and hasattr(head, "weight")


def test_inputs_embeds_matches_input_ids(pair):
    """ModelTesterMixin.test_inputs_embeds_matches_input_ids: text-only ids (image tokens
    replaced by the pad id, pixel values dropped) and their embeddings give the same logits."""
    input_ids = inputs_for_common()["input_ids"].masked_fill(
        inputs_for_common()["input_ids"] == IMAGE_TOKEN_ID, PAD_TOKEN_ID
    )
    embeds = pair.ours.get_input_embeddings()(input_ids)
    got = pair.ours(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, pair.ours(input_ids=input_ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, pair.ref(inputs_embeds=embeds).logits, atol=ATOL, rtol=0)


def test_inputs_embeds_with_images(pair):
    """ModelTesterMixin.test_inputs_embeds, multimodal: embeddings of ids that still hold the
    image tokens, with pixel values, give transformers' logits."""
    inputs = inputs_for_common()
    embeds = pair.ref.get_input_embeddings()(inputs["input_ids"])
    kwargs = {"inputs_embeds": embeds, "pixel_values": inputs["pixel_values"]}
    torch.testing.assert_close(pair.ours(**kwargs).logits, pair.ref(**kwargs).logits, atol=ATOL, rtol=0)


def test_get_image_features(pair):
    """ModelTesterMixin.test_get_image_features_output (the original skips only its shape
    check, FastVLM's hidden size sits at index -3): the output object's pooler_output is
    transformers' projected features, (batch, NUM_IMAGE_TOKENS, text hidden size)."""
    pixel_values = inputs_for_common()["pixel_values"]
    got = pair.ours.get_image_features(pixel_values)
    expected = pair.ref.get_image_features(pixel_values)
    assert got.pooler_output.shape == (BATCH_SIZE, NUM_IMAGE_TOKENS, TEXT_CONFIG["hidden_size"])
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", {"text_config": "flash_attention_2"}])
def test_attn_implementations_give_the_same_logits(pair, attn):
    """ModelTesterMixin.test_eager_matches_sdpa_inference / test_sdpa_can_dispatch_composite_models:
    every accepted attn_implementation gives the reference logits (flash-attn for the text
    model falls back to SDPA where the kernel is missing)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FastVLM.from_pretrained(
            pair.folder, dtype=torch.float32, attn_implementation=attn, progress=False
        )
    inputs = inputs_for_common()
    assert_close_where(logits_of(model, inputs), logits_of(pair.ref, inputs), inputs["attention_mask"])


def test_flash_attention_for_the_whole_model_is_refused(pair):
    """test_sdpa_can_dispatch_composite_models' counterpart: the timm tower has no flash
    attention, so transformers refuses "flash_attention_2" for the whole model; so do we."""
    with pytest.raises(FastVLMError, match="flash_attention_2") as info:
        FastVLM.from_pretrained(pair.folder, attn_implementation="flash_attention_2", progress=False)
    assert "\n" not in str(info.value)


def test_dtype_auto_is_the_checkpoints_dtype(pair, tmp_path):
    """PreTrainedModel.from_pretrained(dtype="auto") (tests/utils/test_modeling_utils.py):
    the weights keep the dtype the checkpoint stores."""
    assert FastVLM.from_pretrained(pair.folder, dtype="auto", progress=False).dtype == torch.float32
    copy.deepcopy(pair.ref).to(torch.bfloat16).save_pretrained(tmp_path)  # the shared one stays float32
    assert FastVLM.from_pretrained(tmp_path, dtype="auto", progress=False).dtype == torch.bfloat16


def test_model_outputs_equivalence(pair):
    """ModelTesterMixin.test_model_outputs_equivalence: return_dict=False gives the same
    values as a tuple."""
    inputs = inputs_for_common()
    as_tuple = pair.ours(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], pair.ours(**inputs).logits, atol=0, rtol=0)


def test_logits_to_keep(pair):
    """GenerationTesterMixin.test_generate_methods_with_logits_to_keep (its forward part):
    logits_to_keep=1 gives the last position's logits only, transformers' values."""
    inputs = inputs_for_common()
    last = pair.ours(**inputs, logits_to_keep=1).logits
    assert last.shape == (BATCH_SIZE, 1, TEXT_CONFIG["vocab_size"])
    torch.testing.assert_close(last, pair.ours(**inputs).logits[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, pair.ref(**inputs, logits_to_keep=1).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["output_attentions", "output_hidden_states", "use_cache"])
def test_attention_and_hidden_state_outputs_are_refused(pair, name):
    """ModelTesterMixin.test_attention_outputs / test_hidden_states_output /
    test_retain_grad_hidden_states_attentions (and the cache of test_past_key_values_format):
    the FastVLM tester skips attentions for the timm tower; we return neither attentions,
    hidden states nor a cache from forward, and say so in one line."""
    with pytest.raises(FastVLMError, match=name) as info:
        pair.ours(**inputs_for_common(), **{name: True})
    assert "\n" not in str(info.value)
