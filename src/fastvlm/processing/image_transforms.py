"""RGB PIL image -> float32 pixel tensor (3, H, W), as CLIPImageProcessor computes it.

Two resize paths, one per reference:

* ``"torch"``: transformers 5's default CLIPImageProcessor (torchvision backend) resizes
  the uint8 tensor with ``interpolate(..., antialias=True)``; on CPU, torchvision calls
  the same native uint8 kernel we call, so the result is bit-identical.
* ``"pil"``: the PIL-based CLIPImageProcessor of transformers 4.x, which Apple's
  original code ran (``Image.resize`` on uint8). It differs from the torch kernel by
  up to 2 intensity levels.

Both bound the work by the output, not the input. A shortest-edge resize of a long,
thin image is huge (1x5000 pixels becomes 1024 x 5,120,000) only for the centre crop
to keep 1024 of it; past ``MAX_RESIZE_FACTOR`` crops' worth of pixels, only the kept
window is resampled (Pillow's resize with a source box, which maps every output pixel
to the same source position as the full resize). Likewise padding to a square: a
square side beyond ``MAX_SQUARE_SIDE`` is reached by first shrinking the image. Images
within those bounds (every ordinary photo) take the reference path, bit for bit.

This module knows nothing about files or URLs; ``images`` decodes sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError

# PIL resample codes (as stored in preprocessor configs) -> torch interpolate modes.
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}

# Resize the whole image while the result has at most this many crops' worth of pixels
# (aspect ratios up to 16:1 for a square crop); beyond, resample only the crop window.
MAX_RESIZE_FACTOR = 16
# Pad to a square of at most this side (4096^2 RGB = 48 MiB); a larger image is shrunk first.
MAX_SQUARE_SIDE = 4096


@dataclass(frozen=True)
class ImageSettings:
    """Preprocessing of one image; defaults are FastVLM's (1024x1024, mean 0, std 1)."""

    shortest_edge: int | None = 1024  # resize so the short side has this length...
    size: tuple[int, int] | None = None  # ...or, if shortest_edge is None, to exactly (h, w)
    crop_size: tuple[int, int] | None = (1024, 1024)  # centre crop (h, w), None = no crop
    resample: int = 3  # PIL code: 3 bicubic, 2 bilinear, 0 nearest
    rescale_factor: float | None = 1 / 255  # None = no rescale
    mean: tuple[float, ...] | None = (0.0, 0.0, 0.0)  # None = no normalisation
    std: tuple[float, ...] | None = (1.0, 1.0, 1.0)
    pad_to_square: bool = False  # LLaVA's expand2square before anything else
    resize_backend: Literal["torch", "pil"] = "torch"

    def __post_init__(self):
        if self.shortest_edge is None and self.size is None:
            raise ValueError("ImageSettings needs shortest_edge or size")
        if self.resample not in _TORCH_MODES:
            raise ValueError(f"unsupported resample code {self.resample}; use 0, 2 or 3")

    @property
    def output_size(self) -> tuple[int, int]:
        """(h, w) of every preprocessed image; fixed, so the token count is too."""
        if self.crop_size is not None:
            return self.crop_size
        if self.size is not None:
            return self.size
        raise ValueError("without a crop, a shortest-edge resize gives images of varying size")


def preprocess_image(image: Image.Image, settings: ImageSettings) -> torch.Tensor:
    """An RGB image -> float32 tensor (3, H, W)."""
    return normalize_pixels(resize_and_crop(image, settings), settings)


def resize_and_crop(image: Image.Image, settings: ImageSettings) -> torch.Tensor:
    """An RGB image -> uint8 tensor (3, H, W): every step of ``preprocess_image`` but the
    rescale and normalisation, so a server can hold a queued image at a quarter of the size."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    if settings.pad_to_square:
        image = expand_to_square(_fit_side(image, MAX_SQUARE_SIDE, settings.resample), _background(settings))
    height, width = _resized_size(image.height, image.width, settings)
    if height * width > MAX_RESIZE_FACTOR * _crop_area(settings):
        if settings.crop_size is None:
            raise InputError(
                f"the image is {image.width}x{image.height}: too elongated to resize without a crop; "
                "crop it closer to square"
            )
        return center_crop(_resize_window(image, (height, width), settings), settings.crop_size)
    if settings.resize_backend == "pil":
        if (width, height) != image.size:
            image = image.resize((width, height), resample=settings.resample)
        pixels = _to_uint8_tensor(image)
    else:
        pixels = _to_uint8_tensor(image)
        if (height, width) != tuple(pixels.shape[-2:]):
            pixels = _torch_resize(pixels, (height, width), settings.resample)
    if settings.crop_size is not None:
        pixels = center_crop(pixels, settings.crop_size)
    return pixels


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of side max(w, h), image centred (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def center_crop(pixels: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Crop (..., H, W) to ``crop`` around the centre, zero-padding first if too small
    (torchvision's rounding: extra padding goes right/bottom, crop offset rounds down)."""
    height, width = pixels.shape[-2:]
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        pixels = F.pad(pixels, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = pixels.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return pixels[..., top : top + crop_h, left : left + crop_w]


def _crop_area(settings: ImageSettings) -> int:
    height, width = settings.crop_size or settings.size or (settings.shortest_edge,) * 2
    return height * width


def _resize_window(image: Image.Image, size: tuple[int, int], settings: ImageSettings) -> torch.Tensor:
    """The part of ``image`` resized to ``size`` that the centre crop keeps, as uint8 (3, h, w).

    Pillow's source box keeps each output pixel's source position (and reads the filter's
    neighbours outside the box), so the window equals that part of the full resize up
    to rounding; the torch backend's kernel differs from Pillow's by at most 2 levels.
    """
    height, width = size
    (top, out_h), (left, out_w) = _kept(height, settings.crop_size[0]), _kept(width, settings.crop_size[1])
    scale_y, scale_x = image.height / height, image.width / width  # source pixels per output pixel
    box = (left * scale_x, top * scale_y, (left + out_w) * scale_x, (top + out_h) * scale_y)
    window = image.resize((out_w, out_h), resample=settings.resample, box=box)
    return _to_uint8_tensor(window)  # (3, out_h, out_w); center_crop pads if it is short


def _kept(length: int, crop: int) -> tuple[int, int]:
    """(offset, length) of what ``center_crop`` keeps of ``length`` pixels along one axis."""
    if crop >= length:
        return 0, length
    return int((length - crop) / 2.0), crop


def _fit_side(image: Image.Image, side: int, resample: int) -> Image.Image:
    """``image`` shrunk (aspect kept) so that its longer side is at most ``side``."""
    longest = max(image.size)
    if longest <= side:
        return image
    width, height = (max(1, round(n * side / longest)) for n in image.size)
    return image.resize((width, height), resample=resample)


def _resized_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    if settings.shortest_edge is None:
        return settings.size  # type: ignore[return-value]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = settings.shortest_edge, int(settings.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _torch_resize(pixels: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    mode = _TORCH_MODES[resample]
    smooth = mode in ("bilinear", "bicubic")
    batch = pixels.unsqueeze(0)  # (1, 3, H, W)
    # uint8 in, uint8 out: the CPU kernel rounds and clamps exactly like torchvision.
    out = F.interpolate(
        batch, size=size, mode=mode, align_corners=False if smooth else None, antialias=smooth
    )
    return out.squeeze(0)


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalize_pixels(pixels: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) from ``resize_and_crop`` -> what the model takes (float32),
    on the pixels' device. In place on a fresh copy: same values, a third of the memory traffic."""
    values = pixels.to(torch.float32, copy=True)
    scale = settings.rescale_factor
    if settings.mean is None or settings.std is None:
        return values.mul_(scale) if scale is not None else values
    mean = torch.tensor(settings.mean, dtype=torch.float32)
    std = torch.tensor(settings.std, dtype=torch.float32)
    if scale is not None:
        # Fold the rescale into mean/std, as transformers does: (x - m/s) / (sd/s).
        mean, std = mean * (1.0 / scale), std * (1.0 / scale)
    mean, std = mean.to(values.device), std.to(values.device)
    return values.sub_(mean[:, None, None]).div_(std[:, None, None])


def _background(settings: ImageSettings) -> tuple[int, int, int]:
    mean = settings.mean or (0.0, 0.0, 0.0)
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]
