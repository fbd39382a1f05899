"""Turn an image source (PIL image, path, URL, data URI, bytes) into an RGB PIL image.

This module decides what kind of source a value is and reads files itself; data URIs,
limits and http(s) fetches are ``image_source``'s and ``image_fetch``'s, shared with the
server. It knows nothing about pixel tensors; ``image_transforms`` does.
Every failure is an ``InputError`` whose message starts with where the image came
from (e.g. "message 0, part 1").
"""

from __future__ import annotations

import io
import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import InputError
from .image_fetch import fetch_image_sync
from .image_source import (
    ImageLoadOptions,
    ImageSourceError,
    check_image_header,
    check_pixels,
    decode_base64,
    decode_data_uri,
    reason,
)

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

_BASE64_RE = re.compile(r"[A-Za-z0-9+/=\s_-]+")


@dataclass(frozen=True)
class RGBRules:
    """How a checkpoint's reference pipeline turns a decoded image into RGB.

    transformers applies the EXIF orientation and drops alpha when it decodes a
    path/URL/base64 itself, but composites alpha onto white and ignores EXIF for a
    PIL image it is handed. Apple's code only ever calls ``convert("RGB")``.
    """

    exif_transpose_decoded: bool
    composite_alpha_given: bool


HF_RGB_RULES = RGBRules(exif_transpose_decoded=True, composite_alpha_given=True)
APPLE_RGB_RULES = RGBRules(exif_transpose_decoded=False, composite_alpha_given=False)


def load_rgb_image(
    source: ImageSource, options: ImageLoadOptions, rules: RGBRules, where: str
) -> Image.Image:
    """Decode ``source`` and convert it to an RGB image the way ``rules`` say."""
    if isinstance(source, Image.Image):
        check_pixels(source.size, options, where)
        try:
            return _given_to_rgb(source, rules)
        except Exception as exc:  # a lazily opened image decodes here
            raise InputError(f"{where}: cannot decode the image ({reason(exc)})") from exc
    image = _decode(_read_bytes(source, options, where), options, where)
    try:
        if rules.exif_transpose_decoded:
            image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # malformed EXIF, odd modes
        raise InputError(f"{where}: cannot convert the image to RGB ({reason(exc)})") from exc


def _given_to_rgb(image: Image.Image, rules: RGBRules) -> Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if rules.composite_alpha_given and has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _read_bytes(source: ImageSource, options: ImageLoadOptions, where: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        return _read_file(Path(source), options, where)
    if not isinstance(source, str):
        raise InputError(
            f"{where}: an image must be a PIL image, a path, a URL, a data URI or bytes, "
            f"not {type(source).__name__}"
        )
    text = source.strip()
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return fetch_image_sync(text, options, where)
    if lowered.startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"{where}: file:// URLs must name a local file, not host {parsed.netloc!r}")
        return _read_file(Path(urllib.parse.unquote(parsed.path)), options, where)
    if lowered.startswith("data:"):
        return decode_data_uri(text, options, where)
    # With local files off, never look at the disk: whether a file exists must not
    # change the answer a remote client gets.
    if _looks_like_base64(text) and not (options.allow_local_files and _is_file(text)):
        return decode_base64(text, where, "is neither an existing file nor valid base64")
    return _read_file(Path(text).expanduser(), options, where)


def _read_file(path: Path, options: ImageLoadOptions, where: str) -> bytes:
    if not options.allow_local_files:
        raise InputError(
            f"{where}: reading local image files is disabled; send the image as a base64 data URI"
        )
    if not path.is_file():
        raise InputError(f"{where}: no image file at {str(path)[:200]!r}; check the path")
    if path.stat().st_size > options.max_bytes:
        raise InputError(f"{where}: {path} is larger than {options.max_bytes >> 20} MiB")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read {path} ({reason(exc)})") from exc


def _decode(data: bytes, options: ImageLoadOptions, where: str) -> Image.Image:
    check_image_header(data, options, where)  # size, pixels and bombs, before any pixel is decoded
    try:
        # Pillow warns (above ~89 Mpx) or raises (above twice that) on decompression
        # bombs; a warning is an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageSourceError(
            where, f"cannot decode the image ({reason(exc)}); send a valid PNG/JPEG/WebP"
        ) from exc
    return image


def _looks_like_base64(text: str) -> bool:
    # Paths have a "." or a separator that base64 lacks (or are short); raw base64
    # image data is long. transformers also accepts bare base64 strings.
    return len(text) >= 64 and "." not in text and bool(_BASE64_RE.fullmatch(text))


def _is_file(text: str) -> bool:
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False
