"""Read everything the processor needs from a checkpoint folder, for either layout.

* ``fast_vlm`` (Hugging Face): what transformers writes for LlavaProcessor +
  CLIPImageProcessor: image settings in ``processor_config.json["image_processor"]`` or
  ``preprocessor_config.json``; ``patch_size`` and ``vision_feature_select_strategy`` in
  ``processor_config.json``; the chat template in ``processor_config.json``,
  ``chat_template.json``, ``chat_template.jinja`` or ``tokenizer_config.json`` (the first
  found wins, as in transformers).
* ``llava_qwen2`` (Apple): everything follows from config.json (``mm_vision_tower``,
  ``image_aspect_ratio``) and the fixed ``conv_qwen_2`` prompt format.

Only settings are decided here; nothing is tokenised or decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints.files import read_optional_json, read_optional_text
from ..config import APPLE_FORMAT, IMAGE_PLACEHOLDER_ID, Format
from ..errors import CheckpointError
from .chat_template import APPLE_CHAT_TEMPLATE
from .constants import APPLE_VISION_STRIDE, IMAGE_TOKEN
from .image_transforms import ImageSettings
from .images import APPLE_RGB_RULES, HF_RGB_RULES, RGBRules
from .tokenizer import Qwen2Tokenizer

# CLIPImageProcessor's class defaults, used for keys a saved config leaves out.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessorSettings:
    format: Format
    image: ImageSettings
    rgb_rules: RGBRules
    image_token: str  # the marker in prompt text
    image_token_id: int  # the placeholder id in input_ids
    num_image_tokens: int  # placeholder ids per image
    max_length: int | None  # the model's context, None if unknown
    chat_template: str


def load_settings(folder: Path, config: dict[str, Any], fmt: Format, tokenizer: Qwen2Tokenizer):
    """Settings for the checkpoint in ``folder`` (``config`` is its config.json)."""
    if fmt == APPLE_FORMAT:
        return _apple_settings(config, tokenizer)
    return _hf_settings(folder, config, tokenizer)


def _apple_settings(config: dict[str, Any], tokenizer: Qwen2Tokenizer) -> ProcessorSettings:
    tower = config.get("mm_vision_tower")
    try:
        size = int(str(tower).rsplit("_", 1)[-1])  # "mobileclip_l_1024" -> 1024
    except ValueError as exc:
        raise CheckpointError(
            f"config.json mm_vision_tower {tower!r} does not end in an image size like 'mobileclip_l_1024'"
        ) from exc
    if config.get("mm_use_im_start_end"):
        raise CheckpointError("config.json sets mm_use_im_start_end, which FastVLM checkpoints never use")
    image = ImageSettings(
        shortest_edge=size,
        crop_size=(size, size),
        pad_to_square=config.get("image_aspect_ratio") == "pad",
        resize_backend="pil",  # Apple's code ran transformers 4.x's PIL CLIPImageProcessor
    )
    max_length = config.get("tokenizer_model_max_length") or config.get("max_position_embeddings")
    return ProcessorSettings(
        format=APPLE_FORMAT,
        image=image,
        rgb_rules=APPLE_RGB_RULES,
        image_token=IMAGE_TOKEN,
        image_token_id=IMAGE_PLACEHOLDER_ID,
        num_image_tokens=(size // APPLE_VISION_STRIDE) ** 2,
        max_length=_positive_int(max_length) or tokenizer.model_max_length,
        chat_template=APPLE_CHAT_TEMPLATE,
    )


def _hf_settings(folder: Path, config: dict[str, Any], tokenizer: Qwen2Tokenizer) -> ProcessorSettings:
    processor = read_optional_json(folder, "processor_config.json") or {}
    image_dict = processor.get("image_processor") or read_optional_json(folder, "preprocessor_config.json")
    if image_dict is None:
        raise CheckpointError(
            f"{folder} has no image settings (preprocessor_config.json or processor_config.json); "
            "re-download the checkpoint's processor files"
        )
    image = _clip_image_settings(image_dict)
    image_token = processor.get("image_token") or IMAGE_TOKEN
    return ProcessorSettings(
        format="fast_vlm",
        image=image,
        rgb_rules=HF_RGB_RULES,
        image_token=image_token,
        image_token_id=_hf_image_token_id(config, tokenizer, image_token),
        num_image_tokens=_hf_num_image_tokens(processor, config, image),
        max_length=_hf_max_length(config, tokenizer),
        chat_template=_hf_chat_template(folder, processor),
    )


def _clip_image_settings(d: dict[str, Any]) -> ImageSettings:
    kind = str(d.get("image_processor_type") or "CLIPImageProcessor")
    if "CLIPImageProcessor" not in kind:
        raise CheckpointError(f"image processor {kind!r} is not supported; FastVLM uses CLIPImageProcessor")
    size = d.get("size", {"shortest_edge": 224}) if d.get("do_resize", True) else None
    shortest, fixed = None, None
    if isinstance(size, int):  # legacy CLIP configs: an int is the shortest edge
        shortest = size
    elif isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size and "width" in size:
        fixed = (int(size["height"]), int(size["width"]))
    else:
        raise CheckpointError(
            f"unsupported image resize setting {size!r}; expected shortest_edge or height/width"
        )
    crop = d.get("crop_size", {"height": 224, "width": 224}) if d.get("do_center_crop", True) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    normalize = d.get("do_normalize", True)
    try:
        return ImageSettings(
            shortest_edge=shortest,
            size=fixed,
            crop_size=(int(crop["height"]), int(crop["width"])) if crop else None,
            resample=int(d.get("resample", 3)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else None,
            mean=tuple(map(float, d.get("image_mean", _CLIP_MEAN))) if normalize else None,
            std=tuple(map(float, d.get("image_std", _CLIP_STD))) if normalize else None,
            # transformers picks the PIL backend only when asked for it by name.
            resize_backend="pil" if kind.endswith("Pil") or d.get("backend") == "pil" else "torch",
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"unusable image processor settings ({exc}); re-download the checkpoint"
        ) from exc


def _hf_image_token_id(config: dict[str, Any], tokenizer: Qwen2Tokenizer, image_token: str) -> int:
    from_config = config.get("image_token_index", config.get("image_token_id"))
    from_tokenizer = tokenizer.convert_tokens_to_ids(image_token)
    if from_config is not None and from_tokenizer is not None and int(from_config) != from_tokenizer:
        raise CheckpointError(
            f"config.json says the image token id is {from_config} but the tokenizer has {image_token!r} "
            f"at {from_tokenizer}; the checkpoint files do not belong together"
        )
    found = from_config if from_config is not None else from_tokenizer
    return IMAGE_PLACEHOLDER_ID if found is None else int(found)


def _hf_num_image_tokens(processor: dict[str, Any], config: dict[str, Any], image: ImageSettings) -> int:
    patch = processor.get("patch_size")
    if patch is None:
        # Without a processor_config.json transformers cannot expand <image>; the
        # model config still says how many features an image gives.
        seq = config.get("image_seq_length")
        if seq is None:
            raise CheckpointError(
                "neither processor_config.json patch_size nor config.json image_seq_length is set"
            )
        return int(seq)
    try:
        height, width = image.output_size
    except ValueError as exc:
        raise CheckpointError(
            f"images would not have a fixed size, so their token count is unknown ({exc})"
        ) from exc
    count = (height // int(patch)) * (width // int(patch)) + int(
        processor.get("num_additional_image_tokens") or 0
    )
    if processor.get("vision_feature_select_strategy") == "default":
        count -= 1  # LlavaProcessor drops the CLS position for the "default" strategy
    return count


def _hf_max_length(config: dict[str, Any], tokenizer: Qwen2Tokenizer) -> int | None:
    text = config.get("text_config") or {}
    for value in (text.get("max_position_embeddings"), config.get("max_position_embeddings")):
        if _positive_int(value):
            return int(value)
    return tokenizer.model_max_length


def _hf_chat_template(folder: Path, processor: dict[str, Any]) -> str:
    if isinstance(processor.get("chat_template"), str):
        return processor["chat_template"]
    legacy = read_optional_json(folder, "chat_template.json")
    if legacy and isinstance(legacy.get("chat_template"), str):
        return legacy["chat_template"]
    raw = read_optional_text(folder, "chat_template.jinja")
    if raw is not None:
        return raw
    tokenizer_config = read_optional_json(folder, "tokenizer_config.json") or {}
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise CheckpointError(
            f"{folder} has no chat template in chat_template.jinja, chat_template.json or "
            "tokenizer_config.json; re-download the checkpoint's processor files"
        )
    return template


def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None
