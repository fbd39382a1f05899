"""An ``image_url`` -> image file bytes, checked before the request is queued.

The reading itself (data URIs, http(s) fetches with per-hop address checks, size and
pixel limits) is ``fastvlm.processing``'s, the same code the library uses; this module
chooses the server's stricter limits, accepts only the two URL kinds the API has
(``data:`` URIs, and http(s) when remote images were allowed at startup), and turns
failures into OpenAI-style errors. Only the image header is read here: that is enough
to refuse a non-image or a decompression bomb cheaply; the processor decodes the
pixels later, the way the checkpoint's reference pipeline decodes a file.
"""

from __future__ import annotations

import anyio
import httpx

from ..processing.image_fetch import fetch_image
from ..processing.image_source import (
    ImageLoadOptions,
    ImageSourceError,
    check_image_header,
    decode_data_uri,
    is_remote,
)
from .errors import APIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000x5000; Pillow itself warns at ~89 Mpx
MAX_IMAGES_PER_REQUEST = 8
MAX_REQUEST_IMAGE_BYTES = 48 * 1024 * 1024  # what a 64 MB body of base64 can carry
FETCH_TIMEOUT_S = 10.0


def server_image_options(
    *, allow_remote: bool = False, allow_private_hosts: bool = False
) -> ImageLoadOptions:
    """What a request may send: never local files; remote hosts only when allowed."""
    return ImageLoadOptions(
        allow_remote=allow_remote,
        allow_local_files=False,
        max_pixels=MAX_IMAGE_PIXELS,
        timeout_s=FETCH_TIMEOUT_S,
        max_bytes=MAX_IMAGE_BYTES,
        allow_private_hosts=allow_private_hosts,
    )


async def image_bytes(
    url: str, options: ImageLoadOptions, http: httpx.AsyncClient | None, param: str
) -> bytes:
    """The checked file bytes of one ``image_url``; ``APIError`` (400/413) when unusable."""
    try:
        if is_remote(url):
            if not options.allow_remote or http is None:
                raise APIError(
                    400,
                    "Remote image URLs are disabled on this server (start it with --allow-remote-images); "
                    "send the image as a data:image/...;base64, URI.",
                    param=param,
                    code="remote_images_disabled",
                )
            data = await fetch_image(url, options, http, param)
        elif url[:5].lower() == "data:":
            # Decoding base64 (up to 20 MB) is CPU work: keep it off the event loop.
            data = await anyio.to_thread.run_sync(decode_data_uri, url, options, param)
        else:
            raise APIError(
                400,
                "An image URL must be a data:image/...;base64, URI (or http(s) where the server allows it).",
                param=param,
                code="invalid_image",
            )
        await anyio.to_thread.run_sync(check_image_header, data, options, param)
    except ImageSourceError as exc:
        raise as_api_error(exc, param) from exc
    return data


def as_api_error(exc: ImageSourceError, param: str) -> APIError:
    status = 413 if exc.code == "image_too_large" else 400
    detail = exc.detail[:1].upper() + exc.detail[1:]
    if exc.code == "image_host_forbidden":  # the library's hint names a Python option
        detail = detail.split("; ")[0] + (
            ", and this server fetches only from those; send the image as a data:image/...;base64, URI"
        )
    return APIError(status, f"{detail}.", param=param, code=exc.code)
