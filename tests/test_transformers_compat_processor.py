"""``FastVLMProcessor`` against transformers' ``LlavaProcessor`` on the same checkpoint files.

Ports of tests/models/llava/test_processing_llava.py and of the chat-template and
text-option checks of tests/test_processing_common.py (``ProcessorTesterMixin``);
each test names the original it comes from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from fastvlm.errors import InputError
from fastvlm.processing import FastVLMProcessor


@pytest.fixture(scope="module")
def ours(tiny_checkpoint_dir):
    return FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint_dir):
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    processor.tokenizer.padding_side = "left"
    return processor


def image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversation(question: str = "What is shown?", with_image: bool = True):
    parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def assert_same(got, expected, keys=("input_ids", "attention_mask", "pixel_values")):
    for key in keys:
        if key not in expected:
            assert key not in got
            continue
        a, b = got[key], expected[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.shape == b.shape
            torch.testing.assert_close(a.to(b.dtype), b, atol=1e-5, rtol=0)
        elif isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:
            assert np.asarray(a).tolist() == np.asarray(b).tolist()


# -- ProcessorTesterMixin.test_apply_chat_template_image (defaults and the docs' pattern) --------
@pytest.mark.slow
def test_chat_template_defaults_and_the_docs_pattern(ours, ref):
    conv = conversation()
    assert ours.apply_chat_template(conv) == ref.apply_chat_template(conv)  # a string, no generation prompt
    prompt = ours.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    picture = image(0)
    got = ours(images=picture, text=prompt, return_tensors="pt")
    assert_same(got, ref(images=picture, text=prompt, return_tensors="pt"))
    batch = [conversation("a"), conversation("a much longer question", with_image=False)]
    assert ours.apply_chat_template(batch) == ref.apply_chat_template(batch)


# -- ProcessorTesterMixin.test_apply_chat_template_image: tokenize / return_dict ----------------
def test_chat_template_tokenize_and_return_dict(ours, ref):
    conv = [
        {"role": "user", "content": [{"type": "image", "image": image(1)}, {"type": "text", "text": "Hi?"}]}
    ]
    ids = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    expected = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    assert torch.equal(ids, expected)
    got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    want = ref.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert_same(got, want)


# -- ProcessorTesterMixin.test_apply_chat_template_continue_final_message ------------------------
def test_continue_final_message(ours, ref):
    conv = conversation() + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    prompt = ours.apply_chat_template(conv, continue_final_message=True)
    assert prompt == ref.apply_chat_template(conv, continue_final_message=True)
    assert prompt.endswith("It is a")
    with pytest.raises(InputError, match="not compatible"):
        ours.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)


# -- ProcessorTesterMixin.test_tokenizer_defaults / padding="max_length" ----------------------------
def test_padding_max_length(ours, ref):
    texts = ["<image>short", "<image>a rather longer prompt here"]
    pictures = [image(2), image(3, (64, 20))]
    for side in ("left", "right"):
        ours.tokenizer.padding_side = ref.tokenizer.padding_side = side
        got = ours(images=pictures, text=texts, padding="max_length", max_length=20, return_tensors="pt")
        want = ref(images=pictures, text=texts, padding="max_length", max_length=20, return_tensors="pt")
        assert got["input_ids"].shape == (2, 20)
        assert_same(got, want)
    ours.tokenizer.padding_side = ref.tokenizer.padding_side = "left"


# -- test_processing_llava.py::test_special_mm_token_truncation ------------------------------------
def test_truncation_refuses_to_cut_image_tokens(ours, ref):
    texts = ["lorem <image> ipsum", "dolor sit <image> amet consectetur"]
    pictures = [image(4), image(5)]
    ours(text=texts, images=pictures, return_tensors="pt", truncation=None, padding=True)
    with pytest.raises(ValueError):
        ref(text=texts, images=pictures, return_tensors="pt", truncation=True, padding=True, max_length=5)
    with pytest.raises(InputError, match="truncation would cut image tokens"):
        ours(text=texts, images=pictures, return_tensors="pt", truncation=True, padding=True, max_length=5)
    # A cut that leaves every image whole agrees with transformers.
    texts = ["<image> lorem ipsum dolor", "<image> sit amet consectetur adipiscing"]
    kwargs = dict(return_tensors="pt", truncation=True, padding=True, max_length=6)
    got = ours(text=texts, images=pictures, **kwargs)
    assert got["input_ids"].shape == (2, 6)
    assert_same(got, ref(text=texts, images=pictures, **kwargs))


# -- ProcessorTesterMixin.test_*: return_tensors "np" and None -----------------------------------
def test_return_tensors_np_and_none(ours, ref):
    texts = ["<image>one", "<image>two words"]
    pictures = [image(6), image(7)]
    got = ours(images=pictures, text=texts, return_tensors="np")
    want = ref(images=pictures, text=texts, return_tensors="np", padding=True)
    assert_same(got, want)
    assert got["input_ids"].dtype == np.int64 and got["pixel_values"].dtype == np.float32
    lists = ours(text=texts[:1], images=pictures[:1], return_tensors=None)
    assert lists["input_ids"] == want["input_ids"][:1, -len(lists["input_ids"][0]) :].tolist()
    with pytest.raises(InputError, match="return_tensors"):
        ours(text="x", return_tensors="tf")


# -- ProcessorTesterMixin: tokenizer options pass through (add_special_tokens) --------------------
def test_add_special_tokens(ours, ref):
    for add in (True, False):
        got = ours(text="Hello there", add_special_tokens=add)
        assert (
            got["input_ids"].tolist()
            == ref(text="Hello there", add_special_tokens=add, return_tensors="pt")["input_ids"].tolist()
        )


# -- ProcessorTesterMixin.test_processor_batch_decode / clean_up_tokenization_spaces ---------------
def test_batch_decode_clean_up_tokenization_spaces(ours, ref):
    ids = ref.tokenizer(["Hello , world ! I 'm here .", "do n't stop"], padding=True)["input_ids"]
    # transformers 5 ignores the clean-up for BPE tokenizers (with a warning); so do we.
    ours.tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = False
    for clean in (True, False, None):
        kwargs = {} if clean is None else {"clean_up_tokenization_spaces": clean}
        got = ours.batch_decode(torch.tensor(ids), skip_special_tokens=True, **kwargs)
        assert got == ref.batch_decode(ids, skip_special_tokens=True, **kwargs)
    assert ours.decode(ids[0], clean_up_tokenization_spaces=True) == ref.decode(
        ids[0], clean_up_tokenization_spaces=True
    )


# -- test_processing_llava.py::test_get_num_vision_tokens -------------------------------------------
def test_get_num_vision_tokens(ours, ref):
    sizes = [(100, 100), (300, 100), (500, 30)]
    got = ours._get_num_multimodal_tokens(image_sizes=sizes)
    want = ref._get_num_multimodal_tokens(image_sizes=sizes)
    assert "num_image_tokens" in got and "num_image_patches" in got
    assert got["num_image_tokens"] == want["num_image_tokens"] == [ours.num_image_tokens] * 3
    assert got["num_image_patches"] == want["num_image_patches"]
    assert "num_image_tokens" not in ours._get_num_multimodal_tokens()


def test_bad_text_options_are_input_errors(ours):
    with pytest.raises(InputError, match="padding"):
        ours(text="x", padding="sideways")
    with pytest.raises(InputError, match="truncation"):
        ours(text="x", truncation="middle", max_length=3)
