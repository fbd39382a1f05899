"""Inputs for FastVLM: tokenizer, chat template, image preprocessing, the processor."""

from ..config import IMAGE_PLACEHOLDER_ID
from .batch import BatchInputs
from .constants import IMAGE_TOKEN
from .image_transforms import ImageSettings, preprocess_image
from .images import ImageLoadOptions, load_rgb_image
from .processor import FastVLMProcessor
from .tokenizer import Qwen2Tokenizer, StreamDecoder

__all__ = [
    "BatchInputs",
    "FastVLMProcessor",
    "IMAGE_PLACEHOLDER_ID",
    "IMAGE_TOKEN",
    "ImageLoadOptions",
    "ImageSettings",
    "Qwen2Tokenizer",
    "StreamDecoder",
    "load_rgb_image",
    "preprocess_image",
]
