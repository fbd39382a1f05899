"""Check an ``image_url`` before it reaches the engine: scheme, size, pixels, format.

Only two kinds of URL are accepted: ``data:image/...;base64,`` URIs, and http(s)
URLs when remote images were allowed at startup (otherwise nothing is fetched).
The result is the image file's bytes; the processor decodes them in the worker, the
way the checkpoint's reference pipeline decodes a file (EXIF orientation included).
Here only the header is read: that is enough to refuse a non-image or a
decompression bomb cheaply, without decoding pixels on the request path.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from .errors import APIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000x5000; Pillow itself warns at ~89 Mpx
FETCH_TIMEOUT_S = 10.0

_DATA_URI = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    allow_remote: bool = False
    fetch_timeout_s: float = FETCH_TIMEOUT_S


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def decode_data_uri(url: str, limits: ImageLimits, param: str) -> bytes:
    """The file bytes of a base64 data URI, checked (runs off the event loop)."""
    match = _DATA_URI.match(url)
    if not match:
        if is_remote(url) and not limits.allow_remote:
            raise APIError(
                400,
                "Remote image URLs are disabled on this server (start it with --allow-remote-images); "
                "send the image as a data:image/...;base64, URI.",
                param=param,
                code="remote_images_disabled",
            )
        raise _invalid("An image URL must be a data:image/...;base64, URI.", param)
    media = match["media"].lower()
    if media and not media.startswith("image/"):
        raise _invalid(f"The data URI has media type {media!r}, not an image.", param)
    if ";base64" not in match["params"].lower():
        raise _invalid("The image data URI must be base64-encoded (';base64,').", param)
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > limits.max_bytes + 3:  # refuse before decoding anything
        raise _too_big(limits, param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(f"The image's base64 data is invalid ({exc}).", param) from exc
    return check_image(data, limits, param)


async def fetch_image(url: str, limits: ImageLimits, client: httpx.AsyncClient, param: str) -> bytes:
    """Download an http(s) image with a timeout, reading at most ``max_bytes``."""
    chunks, size = [], 0
    try:
        async with client.stream(
            "GET", url, timeout=limits.fetch_timeout_s, follow_redirects=True
        ) as response:
            if response.status_code != 200:
                raise _invalid(f"Fetching the image failed with HTTP {response.status_code}.", param)
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise _too_big(limits, param)
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _invalid(f"Cannot fetch the image ({type(exc).__name__}).", param) from exc
    return b"".join(chunks)


def check_image(data: bytes, limits: ImageLimits, param: str) -> bytes:
    """Refuse data that is too large or whose header is not an image Pillow reads."""
    if len(data) > limits.max_bytes:
        raise _too_big(limits, param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
    except UnidentifiedImageError as exc:
        raise _invalid("The data is not an image Pillow can read (PNG, JPEG, WebP, ...).", param) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(limits, param) from exc
    except Exception as exc:  # broken headers raise OSError, SyntaxError, struct.error, ...
        raise _invalid(f"The image cannot be read ({type(exc).__name__}).", param) from exc
    if width * height > limits.max_pixels:
        raise _too_many_pixels(limits, param, f" ({width}x{height})")
    return data


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_image")


def _too_big(limits: ImageLimits, param: str) -> APIError:
    message = f"The image is larger than {limits.max_bytes >> 20} MB."
    return APIError(413, message, param=param, code="image_too_large")


def _too_many_pixels(limits: ImageLimits, param: str, size: str = "") -> APIError:
    message = f"The image{size} has more than {limits.max_pixels / 1e6:.0f} million pixels; downscale it."
    return APIError(413, message, param=param, code="image_too_large")
