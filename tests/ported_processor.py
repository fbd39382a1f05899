"""Shared setup of the ported processor tests (tests/test_processing_common.py's
``ProcessorTesterMixin``): the processor saved once as the mixin's setUpClass does, the
transformers ``LlavaProcessor`` on the same files, and the mixin's input builders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import builders
from fastvlm.processing import FastVLMProcessor

PHOTO = str(builders.shared_assets() / "images" / "000000039769.png")  # a local stand-in for coco_sample.png


@pytest.fixture(scope="module")
def saved(tiny_checkpoint_dir, tmp_path_factory):
    """The mixin's setUpClass: the processor saved once; its config.json is the model's."""
    folder = tmp_path_factory.mktemp("ported_processing")
    (folder / "config.json").write_text((tiny_checkpoint_dir / "config.json").read_text())
    FastVLMProcessor.from_pretrained(tiny_checkpoint_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(saved):
    return FastVLMProcessor.from_pretrained(saved)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint_dir):
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    processor.tokenizer.padding_side = "left"
    return processor


def prepare_text_inputs(batch_size: int | None = None, image: bool = True):
    """ProcessorTesterMixin.prepare_text_inputs(modalities="image")."""
    token = "<image>" if image else ""
    if batch_size is None:
        return f"lower newer {token}"
    return [f"lower newer {token}", f" {token} upper older longer string"] + [f"lower newer {token}"] * (
        batch_size - 2
    )


def prepare_image_inputs(batch_size: int | None = None):
    """ProcessorTesterMixin.prepare_image_inputs: random 400x30 pictures."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(np.moveaxis(rng.integers(0, 255, (3, 30, 400), dtype=np.uint8), 0, -1))
    return picture if batch_size is None else [picture] * batch_size


def assert_same(got, expected) -> None:
    assert set(got.keys()) == set(expected.keys())
    for key in expected:
        torch.testing.assert_close(
            torch.as_tensor(got[key]).to(expected[key].dtype), expected[key], atol=1e-5, rtol=0
        )
