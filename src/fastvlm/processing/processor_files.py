"""Write a processor's files in the layout transformers' ``LlavaProcessor`` saves.

``tokenizer.json`` + ``tokenizer_config.json`` (Qwen2Tokenizer), ``chat_template.jinja``
and ``processor_config.json`` (the CLIPImageProcessor settings nested under
``image_processor``, plus ``patch_size`` and ``image_token``). ``AutoProcessor`` and
``FastVLMProcessor.from_pretrained`` read them back; the latter also needs the model's
``config.json`` in the same folder, as every checkpoint has.

An Apple-layout processor is refused: it pads images to a square, which
CLIPImageProcessor cannot express, so the files would preprocess differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import APPLE_FORMAT
from ..errors import CheckpointError
from .image_transforms import ImageSettings
from .settings import ProcessorSettings
from .tokenizer import Qwen2Tokenizer


def save_processor(tokenizer: Qwen2Tokenizer, settings: ProcessorSettings, folder: str | Path) -> list[str]:
    """Write the processor files into ``folder``; returns their paths."""
    if settings.format == APPLE_FORMAT:
        raise CheckpointError(
            "cannot save an Apple (llava_qwen2) processor in the transformers layout: its images are "
            "padded to a square, which CLIPImageProcessor cannot do; keep the Apple checkpoint's files"
        )
    processor = processor_config(settings)  # checks before anything is written
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass a folder to save the processor in")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer_config.json": _json(tokenizer_config(tokenizer)),
        "processor_config.json": _json(processor),
        "chat_template.jinja": settings.chat_template,
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return [str(folder / name) for name in [*files, "tokenizer.json"]]


def tokenizer_config(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """What transformers 5 writes for a Qwen2Tokenizer; the added tokens are in tokenizer.json too."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "LlavaProcessor",
        "backend": "tokenizers",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": tokenizer.clean_up_tokenization_spaces,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": tokenizer.model_max_length,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "extra_special_tokens": [t for t in tokenizer.all_special_tokens if t not in _named(tokenizer)],
        "added_tokens_decoder": {
            str(index): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for index, token in sorted(added.items())
        },
    }


def _named(tokenizer: Qwen2Tokenizer) -> set[str]:
    return set(tokenizer.special_tokens_map.values())


def processor_config(settings: ProcessorSettings) -> dict[str, Any]:
    return {
        "processor_class": "LlavaProcessor",
        "image_processor": image_processor_config(settings.image),
        "image_token": settings.image_token,
        "num_additional_image_tokens": 0,
        "patch_size": _patch_size(settings),
        "vision_feature_select_strategy": None,
    }


def image_processor_config(image: ImageSettings) -> dict[str, Any]:
    """Our image settings as CLIPImageProcessor's keys (the PIL backend by its class name)."""
    if image.shortest_edge is not None:
        size: dict[str, int] = {"shortest_edge": image.shortest_edge}
    else:
        size = {"height": image.size[0], "width": image.size[1]}
    kind = "CLIPImageProcessorPil" if image.resize_backend == "pil" else "CLIPImageProcessor"
    out: dict[str, Any] = {
        "image_processor_type": kind,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": size,
        "resample": image.resample,
        "do_center_crop": image.crop_size is not None,
        "do_rescale": image.rescale_factor is not None,
        "do_normalize": image.mean is not None,
    }
    if image.crop_size is not None:
        out["crop_size"] = {"height": image.crop_size[0], "width": image.crop_size[1]}
    if image.rescale_factor is not None:
        out["rescale_factor"] = image.rescale_factor
    if image.mean is not None:
        out["image_mean"], out["image_std"] = list(image.mean), list(image.std)
    return out


def _patch_size(settings: ProcessorSettings) -> int:
    """LlavaProcessor counts (H / patch) * (W / patch) tokens per image; find that patch."""
    height, width = settings.image.output_size
    count = settings.num_image_tokens
    side = math.isqrt(count)
    patch = height // side if side and side * side == count else 0
    if not patch or (height // patch) * (width // patch) != count:
        raise CheckpointError(
            f"{count} image tokens per {height}x{width} image is not a square grid of patches, which "
            "LlavaProcessor needs to expand <image>"
        )
    return patch


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
