"""Keyword arguments of ``FastVLMProcessor.__call__``, taken in transformers' shapes.

transformers' processors take options flat (``padding="max_length", do_rescale=True``)
or grouped (``text_kwargs={...}``, ``images_kwargs={...}``, ``common_kwargs={...}``); an
option given both ways is an error there and here. Text options go to tokenisation.
Image options may change the steps after resizing (rescale, normalise); options that
would change the image size, and with it the number of image tokens the model expects,
are refused in one line, as is anything unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError
from .image_transforms import ImageSettings
from .text_options import TextOptions

_TEXT = {"return_tensors", "padding", "truncation", "max_length", "add_special_tokens"}
_OURS = {"max_new_tokens", "check_length"}  # our additions: the context-length check
_IMAGE = {"do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb"}
_SIZE = {"do_resize", "size", "crop_size", "do_center_crop", "resample", "do_pad", "patch_size"}
_GROUPS = ("text_kwargs", "images_kwargs", "common_kwargs")


@dataclass(frozen=True)
class CallOptions:
    text: TextOptions
    image: ImageSettings
    max_new_tokens: int = 0
    check_length: bool = True


def parse_call_options(kwargs: dict[str, Any], image: ImageSettings) -> CallOptions:
    """Flat and grouped keyword arguments -> the options of one processor call."""
    flat = _flatten(kwargs)
    for key in flat:
        if key in _SIZE:
            raise InputError(
                f"{key} would change the image size and so the image token count the model expects; "
                "the checkpoint's image settings are fixed"
            )
        if key not in _TEXT | _OURS | _IMAGE:
            raise InputError(f"the processor got an unknown argument {key!r}")
    text = TextOptions(
        return_tensors=flat.get("return_tensors", "pt"),
        padding=flat.get("padding", True),
        truncation=flat.get("truncation", False),
        max_length=flat.get("max_length"),
        add_special_tokens=flat.get("add_special_tokens", True),
    )
    return CallOptions(
        text=text,
        image=_image_settings(image, {k: v for k, v in flat.items() if k in _IMAGE}),
        max_new_tokens=int(flat.get("max_new_tokens", 0)),
        check_length=bool(flat.get("check_length", True)),
    )


def _flatten(kwargs: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in kwargs.items() if k not in _GROUPS}
    for group in _GROUPS:
        options = kwargs.get(group) or {}
        if not isinstance(options, dict):
            raise InputError(f"{group} must be a dict of options, not {type(options).__name__}")
        for key, value in options.items():
            if key in flat:
                raise InputError(f"{key} is given twice (directly and in {group}); pass it once")
            flat[key] = value
    return flat


def _image_settings(base: ImageSettings, options: dict[str, Any]) -> ImageSettings:
    if not options:
        return base
    if options.get("do_convert_rgb", True) is not True:
        raise InputError("do_convert_rgb=False is not supported: images are always converted to RGB")
    changes: dict[str, Any] = {}
    if "do_rescale" in options or "rescale_factor" in options:
        rescale = options.get("do_rescale", base.rescale_factor is not None)
        factor = options.get("rescale_factor", base.rescale_factor or 1 / 255)
        changes["rescale_factor"] = float(factor) if rescale else None
    if options.keys() & {"do_normalize", "image_mean", "image_std"}:
        normalize = options.get("do_normalize", base.mean is not None)
        mean, std = options.get("image_mean", base.mean), options.get("image_std", base.std)
        if normalize and (mean is None or std is None):
            raise InputError("do_normalize=True needs image_mean and image_std (the checkpoint has none)")
        changes["mean"] = _per_channel(mean) if normalize else None
        changes["std"] = _per_channel(std) if normalize else None
    return replace(base, **changes)


def _per_channel(value: Any) -> tuple[float, ...]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise InputError(f"image_mean and image_std need 3 values (one per channel), not {len(values)}")
    return tuple(float(v) for v in values)
