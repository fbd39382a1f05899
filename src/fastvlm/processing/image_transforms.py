"""RGB PIL image -> float32 pixel tensor (3, H, W), as CLIPImageProcessor computes it.

Two resize paths, one per reference:

* ``"torch"``: transformers 5's default CLIPImageProcessor (torchvision backend) resizes
  the uint8 tensor with ``interpolate(..., antialias=True)``; on CPU, torchvision calls
  the same native uint8 kernel we call, so the result is bit-identical.
* ``"pil"``: the PIL-based CLIPImageProcessor of transformers 4.x, which Apple's
  original code ran (``Image.resize`` on uint8). It differs from the torch kernel by
  up to 2 intensity levels.

This module knows nothing about files or URLs; ``images`` decodes sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# PIL resample codes (as stored in preprocessor configs) -> torch interpolate modes.
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


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
        image = expand_to_square(image, _background(settings))
    height, width = _resized_size(image.height, image.width, settings)
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
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


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
