"""Ports of tests/models/llava/test_processing_llava.py and of ``ProcessorTesterMixin``
(tests/test_processing_common.py) for ``FastVLMProcessor``, with transformers'
``LlavaProcessor`` on the same checkpoint files as the oracle.

tests/test_transformers_compat_processor.py already ports the llava file's
``test_get_num_vision_tokens`` and ``test_special_mm_token_truncation`` and the mixin's
chat-template defaults, ``continue_final_message``, padding, ``return_tensors`` and decode
checks; the mixin's ``apply_chat_template`` checks are in
tests/test_transformers_ported_chat_template.py. Each test names its original.
"""

from __future__ import annotations

import json

import pytest
import transformers

from fastvlm.errors import InputError
from fastvlm.processing import FastVLMProcessor
from ported_processor import PHOTO, assert_same, ours, prepare_image_inputs, prepare_text_inputs, ref, saved

__all__ = ["ours", "ref", "saved"]  # fixtures


@pytest.mark.slow
def test_chat_template_is_saved(ours, ref, saved):
    """test_processing_llava.py::test_chat_template_is_saved: the template is its own file,
    not a key of processor_config.json, and loads back unchanged (in both libraries)."""
    config = json.loads((saved / "processor_config.json").read_text())
    assert "chat_template" not in config and (saved / "chat_template.jinja").is_file()
    assert ours.chat_template == ref.chat_template
    assert transformers.LlavaProcessor.from_pretrained(saved).chat_template == ref.chat_template


def test_processor_to_json_string(saved, tiny_checkpoint_dir):
    """ProcessorTesterMixin.test_processor_to_json_string: the saved processor settings are
    the ones transformers saved for this checkpoint."""
    ours = json.loads((saved / "processor_config.json").read_text())
    theirs = json.loads((tiny_checkpoint_dir / "processor_config.json").read_text())
    for key in ("patch_size", "image_token", "num_additional_image_tokens", "vision_feature_select_strategy"):
        assert ours[key] == theirs[key], key
    for key, value in theirs["image_processor"].items():
        assert ours["image_processor"].get(key, value) == value, key


def test_processor_from_and_save_pretrained(ours, tmp_path, saved):
    """ProcessorTesterMixin.test_processor_from_and_save_pretrained."""
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    files = ours.save_pretrained(tmp_path)
    json.loads(open(files[0]).read())  # check_json_file_has_correct_format
    second = FastVLMProcessor.from_pretrained(tmp_path)
    assert second.settings == ours.settings
    assert second.tokenizer.get_vocab() == ours.tokenizer.get_vocab()


@pytest.mark.slow
def test_processor_from_and_save_pretrained_as_nested_dict(saved, tiny_checkpoint_dir):
    """ProcessorTesterMixin.test_processor_from_and_save_pretrained_as_nested_dict: each
    component loads on its own from the saved folder (with transformers' Auto classes)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    original = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    assert tokenizer.get_vocab() == original.get_vocab()
    assert tokenizer.all_special_tokens == original.all_special_tokens
    image_processor = transformers.AutoImageProcessor.from_pretrained(saved)
    assert repr(image_processor) == repr(transformers.AutoImageProcessor.from_pretrained(tiny_checkpoint_dir))


@pytest.mark.slow
def test_chat_template_save_loading(tmp_path, saved):
    """ProcessorTesterMixin.test_chat_template_save_loading. A dict of named templates (its
    last part) is not supported: the setter refuses it in one line."""
    ours = FastVLMProcessor.from_pretrained(saved)  # its own: the template is changed
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    ours.chat_template = "test template"
    ours.save_pretrained(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": ours.chat_template}))
    (tmp_path / "chat_template.jinja").unlink()
    assert FastVLMProcessor.from_pretrained(tmp_path).chat_template == "test template"
    (tmp_path / "chat_template.json").unlink()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file() and not (tmp_path / "chat_template.json").is_file()
    assert not (tmp_path / "additional_chat_templates").is_dir()
    assert FastVLMProcessor.from_pretrained(tmp_path).chat_template == "test template"
    reloaded = transformers.LlavaProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == reloaded.tokenizer.chat_template == "test template"
    with pytest.raises(InputError, match="chat_template must be a string"):
        ours.chat_template = {"default": "a", "secondary": "b"}


def test_model_input_names(ours):
    """ProcessorTesterMixin.test_model_input_names."""
    inputs = ours(text=prepare_text_inputs(), images=prepare_image_inputs(), return_tensors="pt")
    assert set(inputs.keys()) == set(ours.model_input_names)


def test_image_processor_defaults(ours, ref):
    """ProcessorTesterMixin.test_image_processor_defaults: processor(images=X) is image_processor(X)."""
    expected = ref.image_processor(prepare_image_inputs(), return_tensors="pt")
    assert_same(ours(images=prepare_image_inputs(), return_tensors="pt"), expected)


def test_tokenizer_defaults(ours, ref):
    """ProcessorTesterMixin.test_tokenizer_defaults: processor(text=X) is tokenizer(X)."""
    got = ours(text=["lower newer"], padding=False, return_tensors="pt")
    expected = ref.tokenizer(["lower newer"], padding=False, return_tensors="pt")
    for key in expected:
        assert got[key].tolist() == expected[key].tolist()


def test_tokenizer_decode_defaults(ours, ref):
    """ProcessorTesterMixin.test_tokenizer_decode_defaults."""
    predicted_ids = [[1, 4, 5, 8, 1, 0, 8], [3, 4, 3, 1, 1, 8, 9]]
    assert ours.batch_decode(predicted_ids) == ref.tokenizer.batch_decode(predicted_ids)


def test_processor_with_multiple_inputs(ours):
    """ProcessorTesterMixin.test_processor_with_multiple_inputs."""
    inputs = ours(text=prepare_text_inputs(), images=prepare_image_inputs(), return_tensors="pt")
    assert "input_ids" in inputs and "pixel_values" in inputs
    with pytest.raises((TypeError, ValueError)):
        ours()


def test_processor_text_has_no_visual(ours, ref):
    """ProcessorTesterMixin.test_processor_text_has_no_visual: nested image lists, one row
    without images; and a chat batch where one conversation has no image."""
    text = prepare_text_inputs(batch_size=3)
    nested = [[picture] for picture in prepare_image_inputs(batch_size=3)]
    full = ours(text=text, images=nested, return_tensors="pt", padding=True)
    assert_same(full, ref(text=text, images=nested, return_tensors="pt", padding=True))
    text[0], nested[0] = "lower newer", []
    partial = ours(text=text, images=nested, return_tensors="pt", padding=True)
    assert_same(partial, ref(text=text, images=nested, return_tensors="pt", padding=True))
    assert partial["input_ids"][1:, -full["input_ids"].shape[1] :].tolist() == full["input_ids"][1:].tolist()
    question = {"type": "text", "text": "What is the capital of France?"}
    messages = [
        [{"role": "user", "content": [question]}],
        [{"role": "user", "content": [question, {"type": "image", "path": PHOTO}]}],
    ]
    kwargs = dict(
        add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert_same(ours.apply_chat_template(messages, **kwargs), ref.apply_chat_template(messages, **kwargs))


# ---- the typed-kwargs checks (LlavaProcessor has typed kwargs, so they run for it) ------------


def test_kwargs_overrides_default_tokenizer_kwargs(ours, ref):
    """ProcessorTesterMixin.test_kwargs_overrides_default_tokenizer_kwargs."""
    kwargs = dict(return_tensors="pt", max_length=112, padding="max_length")
    got = ours(text=prepare_text_inputs(), images=prepare_image_inputs(), **kwargs)
    assert got["input_ids"].shape[-1] == 112
    assert_same(got, ref(text=prepare_text_inputs(), images=prepare_image_inputs(), **kwargs))


def test_kwargs_overrides_default_image_processor_kwargs(ours, ref):
    """ProcessorTesterMixin.test_kwargs_overrides_default_image_processor_kwargs."""
    kwargs = dict(do_rescale=True, rescale_factor=-1.0, return_tensors="pt")
    got = ours(text=prepare_text_inputs(), images=prepare_image_inputs(), **kwargs)
    assert got["pixel_values"][0][0].mean() <= 0
    assert_same(got, ref(text=prepare_text_inputs(), images=prepare_image_inputs(), **kwargs))


@pytest.mark.parametrize("batch_size", [None, 2])
def test_unstructured_kwargs(ours, ref, batch_size):
    """ProcessorTesterMixin.test_unstructured_kwargs and test_unstructured_kwargs_batched."""
    padding = "max_length" if batch_size is None else "longest"
    kwargs = dict(return_tensors="pt", do_rescale=True, rescale_factor=-1.0, padding=padding, max_length=76)
    text, images = prepare_text_inputs(batch_size), prepare_image_inputs(batch_size)
    got = ours(text=text, images=images, **kwargs)
    assert got["pixel_values"][0][0].mean() <= 0
    if batch_size is None:
        assert got["input_ids"].shape[-1] == 76
    else:
        assert len(got["input_ids"][0]) == len(got["input_ids"][1]) < 76
    assert_same(got, ref(text=text, images=images, **kwargs))


def test_structured_kwargs_nested(ours, ref):
    """ProcessorTesterMixin.test_structured_kwargs_nested and test_structured_kwargs_nested_from_dict."""
    all_kwargs = {
        "common_kwargs": {"return_tensors": "pt"},
        "images_kwargs": {"do_rescale": True, "rescale_factor": -1.0},
        "text_kwargs": {"padding": "max_length", "max_length": 76},
    }
    got = ours(text=prepare_text_inputs(), images=prepare_image_inputs(), **all_kwargs)
    assert got["pixel_values"][0][0].mean() <= 0 and got["input_ids"].shape[-1] == 76
    assert_same(got, ref(text=prepare_text_inputs(), images=prepare_image_inputs(), **all_kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        # ProcessorTesterMixin.test_doubly_passed_kwargs
        {"images_kwargs": {"do_rescale": True, "rescale_factor": -1.0}, "do_rescale": True},
        # ProcessorTesterMixin.test_overlapping_text_image_kwargs_handling
        {"padding": "max_length", "text_kwargs": {"padding": "do_not_pad"}},
    ],
)
def test_doubly_passed_kwargs(ours, kwargs):
    """ProcessorTesterMixin.test_doubly_passed_kwargs / test_overlapping_text_image_kwargs_handling:
    one option given twice is a ValueError (ours: a one-line InputError)."""
    with pytest.raises(ValueError, match="given twice") as info:
        ours(text=[prepare_text_inputs()], images=prepare_image_inputs(), return_tensors="pt", **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"size": {"shortest_edge": 64}}, "size"), ({"colour": 1}, "colour")]
)
def test_size_changing_and_unknown_options_are_refused(ours, kwargs, named):
    """Not in the mixin: what we refuse instead of silently ignoring. Resizing per call would
    change the image token count the model expects, so the checkpoint's size is fixed."""
    with pytest.raises(InputError, match=named):
        ours(text=prepare_text_inputs(), images=prepare_image_inputs(), **kwargs)
