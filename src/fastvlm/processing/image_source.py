"""Image bytes from a URL or a data URI, within one set of limits; and a cheap header check.

The library, the CLI and the server all read images through here, so an image that
one of them refuses, every one refuses for the same reason. ``ImageLoadOptions``
says what may be read; the server passes a stricter one than the library's default.

Remote images are fetched with httpx, and only from hosts whose every address is
public unless ``allow_private_hosts``: a caller that forwards URLs it was given must
not be made to reach into its own network (SSRF). Redirects are followed by hand so
that each hop is checked the same way, and the connection goes to the address that
was checked, so a DNS answer that changes after the check (rebinding) cannot point
it elsewhere. One overall deadline bounds a fetch, however slowly a host trickles.

Every failure is an ``ImageSourceError``: an ``InputError`` that also carries a short
``code`` (for the server's error body) and the ``detail`` without the location.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import urllib.parse
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .constants import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGE_SIDE,
    MAX_IMAGE_BYTES,
)

MAX_REDIRECTS = 3
USER_AGENT = "fastvlm"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DATA_URI = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLoadOptions:
    """Which sources may be read, and how large an image may be."""

    allow_remote: bool = True  # http(s) URLs; a server turns this off unless asked
    allow_local_files: bool = True  # paths and file:// URLs; a server turns this off
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # width * height, checked before decoding
    max_side: int = DEFAULT_MAX_IMAGE_SIDE  # width and height, checked before decoding
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S  # one deadline for a whole fetch, redirects included
    max_bytes: int = MAX_IMAGE_BYTES
    # Fetch from loopback, private, link-local, ... hosts too. Off by default even in the
    # library: an application that passes its users' URLs through stays safe; whoever
    # means to read http://localhost/... says so.
    allow_private_hosts: bool = False


class ImageSourceError(InputError):
    """An unusable image source: ``"{where}: {detail}"``, with a machine-readable ``code``."""

    def __init__(self, where: str, detail: str, code: str = "invalid_image") -> None:
        super().__init__(f"{where}: {detail}")
        self.where, self.detail, self.code = where, detail, code


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


# -- data URIs and headers -----------------------------------------------------------


def decode_data_uri(uri: str, options: ImageLoadOptions, where: str) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded), refused when too large."""
    match = _DATA_URI.match(uri)
    if not match:
        raise ImageSourceError(where, "malformed data URI; use data:image/png;base64,<data>")
    media = match["media"].strip().lower()
    if media and not media.startswith("image/"):
        raise ImageSourceError(where, f"the data URI has media type {media!r}, not an image")
    payload = uri[match.end() :]
    if len(payload) * 3 // 4 > options.max_bytes + 3:  # refuse before decoding anything
        raise too_large(options, where)
    if ";base64" in match["params"].lower():
        return decode_base64(payload, where, "has invalid base64 data")
    try:
        return urllib.parse.unquote_to_bytes(payload)
    except UnicodeError as exc:  # text that UTF-8 cannot hold (a lone surrogate)
        raise ImageSourceError(where, f"the data URI is not valid text ({reason(exc)})") from exc


def decode_base64(text: str, where: str, problem: str) -> bytes:
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageSourceError(where, f"the image source {problem} ({reason(exc)})") from exc


def check_image_header(data: bytes, options: ImageLoadOptions, where: str) -> tuple[int, int]:
    """(width, height) from the header alone; refuses non-images, oversized data and bombs."""
    if len(data) > options.max_bytes:
        raise too_large(options, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                size = image.size
    except UnidentifiedImageError as exc:
        raise ImageSourceError(
            where, "cannot decode the image: not a format Pillow reads; send a PNG, JPEG or WebP"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSourceError(
            where, f"the image is too large to decode safely ({reason(exc)})", "image_too_large"
        ) from exc
    except Exception as exc:  # broken headers raise OSError, SyntaxError, struct.error, ...
        raise ImageSourceError(
            where, f"cannot decode the image ({reason(exc)}); send a valid PNG/JPEG/WebP"
        ) from exc
    check_pixels(size, options, where)
    return size


def check_pixels(size: tuple[int, int], options: ImageLoadOptions, where: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageSourceError(where, f"the image is empty ({width}x{height})")
    if options.max_pixels is not None and width * height > options.max_pixels:
        raise ImageSourceError(
            where,
            f"the image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the limit of "
            f"{options.max_pixels / 1e6:.1f} Mpx; downscale it",
            "image_too_large",
        )
    if max(width, height) > options.max_side:
        raise ImageSourceError(
            where,
            f"the image is {width}x{height}, longer than {options.max_side} pixels on a side; crop it",
            "image_too_large",
        )


def too_large(options: ImageLoadOptions, where: str) -> ImageSourceError:
    return ImageSourceError(
        where, f"the image is larger than {options.max_bytes >> 20} MiB", "image_too_large"
    )


def reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
