"""Processor -> model -> batch_decode on complete tiny checkpoints, against the reference.

This is the path a user takes from the transformers docs, with ``fastvlm`` imports.
"""

from __future__ import annotations

import pytest
import torch

import builders
from fastvlm import FastVLM
from fastvlm.processing import FastVLMProcessor

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return builders.tiny_checkpoint(tmp_path_factory.mktemp("e2e_hf"), seed=21)


@pytest.fixture(scope="module")
def images():
    folder = builders.shared_assets() / "images"
    return [str(folder / "000000039769.png"), str(folder / "waterview.jpg")]


def _conversation(image: str, question: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": question}]}
    ]


def test_docs_example_matches_reference(hf_checkpoint, images):
    folder, ref = hf_checkpoint
    processor = FastVLMProcessor.from_pretrained(folder)
    model = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    conversations = [
        _conversation(images[0], "What are these?"),
        _conversation(images[1], "Describe the pier."),
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
    )
    assert inputs["pixel_values"].shape == (2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE)
    ours = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = ref.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert ours.tolist() == expected.tolist()
    texts = processor.batch_decode(ours[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_apple_layout_end_to_end(tmp_path, images):
    folder, ref = builders.tiny_checkpoint(tmp_path / "apple", fmt="llava_qwen2", seed=22)
    processor = FastVLMProcessor.from_pretrained(folder)
    model = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert processor.image_token_id == model.config.image_token_id
    inputs = processor.apply_chat_template(
        [_conversation(images[0], "What are these?")],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    ours = model(**inputs).logits
    # The reference sees the same pixels, with its own placeholder id at the same positions.
    ref_ids = inputs["input_ids"].masked_fill(
        inputs["input_ids"] == model.config.image_token_id, ref.config.image_token_id
    )
    expected = ref(input_ids=ref_ids, pixel_values=inputs["pixel_values"]).logits
    assert float((ours - expected).abs().max() / expected.abs().max()) <= 1e-4
    out = model.generate(**inputs, max_new_tokens=4)
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1] :]), str)
