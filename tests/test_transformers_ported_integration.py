"""Ports of ``FastVlmForConditionalGenerationIntegrationTest`` (tests/models/fast_vlm/
test_modeling_fast_vlm.py), run on tiny random weights instead of KamilaMila/FastVLM-0.5B.

Each test is the original's code with our classes in place of transformers' (the
``processor(...)``, ``generate`` and decode calls as written there), on the shared tiny
checkpoint with the real Qwen2 tokenizer. The expected output is what transformers'
``FastVlmForConditionalGeneration`` and ``AutoProcessor`` give on the same folder, in
float32 (the originals use bfloat16 on an accelerator, where two implementations need not
agree to the last token on random weights). The originals' expected texts on the hub
weights are kept in comments.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import builders
from fastvlm import FastVLM, FastVLMProcessor

torch.set_grad_enabled(False)
# The originals' llava_view.jpg (a lake with a pier) and COCO 000000039769 (two cats).
VIEW = builders.shared_assets() / "images" / "waterview.jpg"
CATS = builders.shared_assets() / "images" / "000000039769.png"


@pytest.fixture(scope="module")
def ours(tiny_checkpoint_dir):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32, progress=False)
    return model, FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_dir):
    from transformers import AutoProcessor, FastVlmForConditionalGeneration

    model = FastVlmForConditionalGeneration.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_checkpoint_dir)


def run(pair, *, images, text, batch_decode: bool = False, **call):
    model, processor = pair
    inputs = processor(images=images, text=text, return_tensors="pt", **call)
    output = model.generate(**inputs, max_new_tokens=20)
    if batch_decode:
        return output, processor.batch_decode(output, skip_special_tokens=True)
    return output, processor.decode(output[0], skip_special_tokens=True)


@pytest.mark.slow
def test_small_model_integration_test(ours, reference):
    """FastVlmForConditionalGenerationIntegrationTest.test_small_model_integration_test.

    Hub weights, bfloat16, expected: "user\\n\\nWhat are the things I should be cautious about
    when I visit this place?\\nassistant\\n\\nWhen visiting this place, you should be cautious
    of the following:\\n\\n1. **Weather Conditions**:"
    """
    prompt = (
        "user\n<image>\nWhat are the things I should be cautious about when I visit this place?\nassistant"
    )
    raw_image = Image.open(VIEW)
    got_ids, got = run(ours, images=raw_image, text=prompt)
    expected_ids, expected = run(reference, images=raw_image, text=prompt)
    assert got_ids.tolist() == expected_ids.tolist()
    assert got == expected
    assert got.startswith(
        "user\n\nWhat are the things I should be cautious about when I visit this place?\nassistant"
    )


@pytest.mark.slow
def test_small_model_integration_test_batch(ours, reference):
    """FastVlmForConditionalGenerationIntegrationTest.test_small_model_integration_test_batch.

    Hub weights, bfloat16, expected:
    ["user\\n\\nWhat are the things I should be cautious about when I visit this place? What
      should I bring with me?\\nassistant\\n\\nWhen visiting this serene lake and mountain area,
      it's essential to be mindful of the following:\\n\\n",
     "user\\n\\nWhat is this?\\nassistant\\n\\nThe image depicts two cats, one of which is a
      tabby, lying on a pink surface"]
    """
    prompts = [
        "user\n<image>\nWhat are the things I should be cautious about when I visit this place? "
        "What should I bring with me?\nassistant",
        "user\n<image>\nWhat is this?\nassistant",
    ]
    images = [Image.open(VIEW), Image.open(CATS)]
    ours[1].tokenizer.padding_side = "left"
    reference[1].tokenizer.padding_side = "left"
    got_ids, got = run(ours, images=images, text=prompts, padding=True, batch_decode=True)
    expected_ids, expected = run(reference, images=images, text=prompts, padding=True, batch_decode=True)
    assert got_ids.tolist() == expected_ids.tolist()
    assert got == expected and len(got) == 2


def test_generation_no_images(ours, reference):
    """FastVlmForConditionalGenerationIntegrationTest.test_generation_no_images: a text-only
    prompt generates (the original only checks that generate works)."""
    got = ours[0].generate(**ours[1](text="Hello, I am", return_tensors="pt"), max_new_tokens=20)
    expected = reference[0].generate(
        **reference[1](text="Hello, I am", return_tensors="pt"), max_new_tokens=20
    )
    assert got.tolist() == expected.tolist()
