"""Turn an image source (PIL image, path, URL, data URI, bytes) into an RGB PIL image.

This module owns every read of image data: files, data URIs and (when allowed)
http(s) fetches. It knows nothing about pixel tensors; ``image_transforms`` does.
Every failure is an ``InputError`` whose message starts with where the image came
from (e.g. "message 0, part 1").
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import InputError
from .constants import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

_BASE64_RE = re.compile(r"[A-Za-z0-9+/=\s_-]+")


@dataclass(frozen=True)
class ImageLoadOptions:
    """Which sources may be read, and how large an image may be."""

    allow_remote: bool = True  # http(s) URLs; a server should turn this off
    allow_local_files: bool = True  # paths and file:// URLs; a server should turn this off
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # width * height, checked before decoding
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = MAX_IMAGE_BYTES


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
        _check_pixels(source, options, where)
        try:
            return _given_to_rgb(source, rules)
        except Exception as exc:  # a lazily opened image decodes here
            raise InputError(f"{where}: cannot decode the image ({_reason(exc)})") from exc
    image = _decode(_read_bytes(source, options, where), options, where)
    try:
        if rules.exif_transpose_decoded:
            image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # malformed EXIF, odd modes
        raise InputError(f"{where}: cannot convert the image to RGB ({_reason(exc)})") from exc


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
        return _fetch(text, options, where)
    if lowered.startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"{where}: file:// URLs must name a local file, not host {parsed.netloc!r}")
        return _read_file(Path(urllib.parse.unquote(parsed.path)), options, where)
    if lowered.startswith("data:"):
        return _decode_data_uri(text, where)
    # With local files off, never look at the disk: whether a file exists must not
    # change the answer a remote client gets.
    if _looks_like_base64(text) and not (options.allow_local_files and _is_file(text)):
        return _decode_base64(text, where, "is neither an existing file nor valid base64")
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
        raise InputError(f"{where}: cannot read {path} ({_reason(exc)})") from exc


def _fetch(url: str, options: ImageLoadOptions, where: str) -> bytes:
    if not options.allow_remote:
        raise InputError(f"{where}: fetching remote images is disabled; send the image as a base64 data URI")
    request = urllib.request.Request(url, headers={"User-Agent": "fastvlm"})
    try:
        with urllib.request.urlopen(request, timeout=options.timeout_s) as response:
            data = response.read(options.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"{where}: fetching {url[:200]} failed with HTTP {exc.code}; check the URL") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(
            f"{where}: cannot fetch {url[:200]} ({_reason(exc)}); check the network, "
            "or pass the image as a file or a data URI"
        ) from exc
    if len(data) > options.max_bytes:
        raise InputError(f"{where}: the image at {url[:200]} is larger than {options.max_bytes >> 20} MiB")
    return data


def _decode_data_uri(uri: str, where: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError(f"{where}: malformed data URI (no comma); use data:image/png;base64,<data>")
    if header.lower().endswith(";base64"):
        return _decode_base64(payload, where, "has invalid base64 data")
    return urllib.parse.unquote_to_bytes(payload)


def _decode_base64(text: str, where: str, problem: str) -> bytes:
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{where}: the image source {problem} ({_reason(exc)})") from exc


def _decode(data: bytes, options: ImageLoadOptions, where: str) -> Image.Image:
    try:
        # Pillow warns (above ~89 Mpx) or raises (above twice that) on decompression
        # bombs; a warning is an error here. Our own, lower limit is checked first.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, options, where)
            image.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{where}: the image is too large to decode safely ({_reason(exc)})") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise InputError(
            f"{where}: cannot decode the image ({_reason(exc)}); send a valid PNG/JPEG/WebP"
        ) from exc
    return image


def _check_pixels(image: Image.Image, options: ImageLoadOptions, where: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"{where}: the image is empty ({width}x{height})")
    if options.max_pixels is not None and width * height > options.max_pixels:
        raise InputError(
            f"{where}: the image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the limit of "
            f"{options.max_pixels / 1e6:.1f} Mpx; downscale it"
        )


def _looks_like_base64(text: str) -> bool:
    # Paths have a "." or a separator that base64 lacks (or are short); raw base64
    # image data is long. transformers also accepts bare base64 strings.
    return len(text) >= 64 and "." not in text and bool(_BASE64_RE.fullmatch(text))


def _is_file(text: str) -> bool:
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
