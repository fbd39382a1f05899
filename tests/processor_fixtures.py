"""Builders for the processor tests: checkpoint folders in both layouts and odd images.

The Hugging Face folder is made the way transformers' FastVLM converter makes it
(Qwen2 tokenizer + chat template, ``<image>`` added as a special token,
CLIPImageProcessor at 1024, LlavaProcessor with patch_size 64) and saved with
``save_pretrained``; the older file sets are written the way transformers 4.x saved them.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

from PIL import Image

HF_CONFIG = {
    "model_type": "fast_vlm",
    "image_token_index": 151646,
    "image_seq_length": 256,
    "text_config": {"model_type": "qwen2", "max_position_embeddings": 32768},
}
APPLE_CONFIG = {
    "model_type": "llava_qwen2",
    "mm_vision_tower": "mobileclip_l_1024",
    "image_aspect_ratio": "pad",
    "mm_use_im_start_end": False,
    "tokenizer_model_max_length": 8192,
    "max_position_embeddings": 32768,
    "vocab_size": 151936,
}
CLIP_KWARGS = {
    "crop_size": {"height": 1024, "width": 1024},
    "image_mean": [0.0, 0.0, 0.0],
    "image_std": [1.0, 1.0, 1.0],
    "size": {"shortest_edge": 1024},
}
IMAGE_ENTRY = {
    "content": "<image>",
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": True,
}


def chat_template(assets: Path) -> str:
    path = assets / "tokenizer-qwen2" / "chat_template.fastvlm-hf.json"
    return json.loads(path.read_text())["chat_template"]


def build_hf_checkpoint(folder: Path, assets: Path):
    """Save a transformers FastVLM processor to ``folder``; return the in-memory one."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer-qwen2", chat_template=chat_template(assets))
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    processor = LlavaProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessor(**CLIP_KWARGS))
    processor.patch_size = 64
    processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    return processor


def build_legacy_hf_checkpoint(folder: Path, assets: Path, template_in: str) -> None:
    """The file set transformers 4.x wrote: slow tokenizer files, preprocessor_config.json.

    ``template_in``: "tokenizer_config", "chat_template.json" or "added_tokens.json" (the
    last also drops ``added_tokens_decoder`` so only the oldest files describe tokens).
    """
    folder.mkdir(parents=True)
    source = assets / "tokenizer-qwen2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["151646"] = IMAGE_ENTRY
    config.pop("chat_template")
    template = chat_template(assets)
    if template_in == "tokenizer_config":
        config["chat_template"] = template
    else:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    if template_in == "added_tokens.json":
        del config["added_tokens_decoder"]
        added = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646}
        (folder / "added_tokens.json").write_text(json.dumps(added))
        specials = {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"],
            "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False},
            "pad_token": "<|endoftext|>",
        }
        (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "resample": 3, **CLIP_KWARGS}
    preprocessor.update(do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255)
    preprocessor.update(do_normalize=True, do_convert_rgb=True, processor_class="LlavaProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    processor = {"image_token": "<image>", "patch_size": 64, "vision_feature_select_strategy": None}
    processor.update(num_additional_image_tokens=0, processor_class="LlavaProcessor")
    (folder / "processor_config.json").write_text(json.dumps(processor))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))


def build_apple_checkpoint(folder: Path, assets: Path) -> None:
    """An Apple (llava_qwen2) folder: config.json and the plain Qwen2 tokenizer files."""
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(assets / "tokenizer-qwen2" / name, folder / name)
    (folder / "config.json").write_text(json.dumps(APPLE_CONFIG))


def apple_reference_pixels(image: Image.Image):
    """Apple's pipeline with transformers' PIL CLIPImageProcessor: LLaVA's expand2square
    (background = mean * 255 = black), then resize/crop/rescale."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = image.convert("RGB")
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    if width > height:
        square.paste(image, (0, (width - height) // 2))
    else:
        square.paste(image, ((height - width) // 2, 0))
    return CLIPImageProcessorPil(**CLIP_KWARGS)(square, return_tensors="pt")["pixel_values"], square


def encode_image(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(image, "JPEG", exif=exif.tobytes(), quality=95)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (a decompression bomb) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")
