"""Check an ``image_url`` before it reaches the engine: scheme, size, pixels, format.

Only two kinds of URL are accepted: ``data:image/...;base64,`` URIs, and http(s)
URLs when remote images were allowed at startup (otherwise nothing is fetched).
Even then a URL is fetched only from hosts whose every address is public (unless
private hosts were allowed too), so a client cannot make the server reach into its
own network (SSRF); redirects are followed by hand and each hop is checked the same way.
The result is the image file's bytes; the processor decodes them in the worker, the
way the checkpoint's reference pipeline decodes a file (EXIF orientation included).
Here only the header is read: that is enough to refuse a non-image or a
decompression bomb cheaply, without decoding pixels on the request path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
import warnings
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from .errors import APIError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000x5000; Pillow itself warns at ~89 Mpx
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DATA_URI = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    allow_remote: bool = False
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    allow_private_hosts: bool = False  # fetch from loopback, private, link-local, ... hosts too


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
    """Download an http(s) image within ``fetch_timeout_s`` in all, reading at most ``max_bytes``.

    Redirects are followed here rather than by httpx, so that every hop's URL and host
    are checked before anything is sent to it.
    """
    # httpx's timeout bounds each connect or read; a host trickling one byte at a time
    # would hold the request (and its queue slot) far longer without an overall limit.
    try:
        return await asyncio.wait_for(_fetch(url, limits, client, param), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise _invalid(
            f"Fetching the image took longer than {limits.fetch_timeout_s:g} s; send it as a data URI.", param
        ) from None


async def _fetch(url: str, limits: ImageLimits, client: httpx.AsyncClient, param: str) -> bytes:
    target = _parse_url(url, param)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            address = await _checked_address(target, limits, param)
            async with _get(client, target, address, limits) as response:
                if not response.has_redirect_location:
                    return await _read_image(response, limits, param)
                target = _redirect_target(target, response.headers["location"], param)
    except httpx.HTTPError as exc:
        raise _invalid(f"Cannot fetch the image ({type(exc).__name__}).", param) from exc
    raise _invalid(f"The image URL redirects more than {MAX_REDIRECTS} times; link the image itself.", param)


def _parse_url(url: str, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _invalid(f"The image URL is invalid ({exc}).", param) from exc
    if parsed.scheme not in ("http", "https"):
        raise _forbidden_url(f"The image URL's scheme {parsed.scheme!r} is not fetched; use http(s).", param)
    if parsed.userinfo:
        raise _forbidden_url(
            "Image URLs with credentials (user:password@host) are not fetched; use a URL without them.",
            param,
        )
    if not parsed.host:
        raise _invalid("The image URL has no host.", param)
    return parsed


def _redirect_target(current: httpx.URL, location: str, param: str) -> httpx.URL:
    try:
        return _parse_url(str(current.join(location)), param)
    except httpx.InvalidURL as exc:
        raise _invalid(f"The image host redirected to an invalid URL ({exc}).", param) from exc


async def _checked_address(url: httpx.URL, limits: ImageLimits, param: str) -> IPAddress | None:
    """The public address to connect to; None when private hosts are allowed (then httpx resolves)."""
    if limits.allow_private_hosts:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await asyncio.wait_for(
            resolve_host(url.raw_host.decode("ascii"), port), limits.fetch_timeout_s
        )
    except (OSError, asyncio.TimeoutError) as exc:  # socket.gaierror is an OSError
        raise _invalid(f"Cannot resolve the image host {url.host!r}.", param) from exc
    # Every address, not just the first: a connection may try any of them.
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise APIError(
            400,
            f"The image host {url.host!r} is not a public internet host, and this server fetches "
            "only from those; send the image as a data:image/...;base64, URI.",
            param=param,
            code="image_host_forbidden",
        )
    return addresses[0]


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to; the system resolver runs off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]  # drop IPv6 zone ids


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` is routable on the public internet.

    IPv6 forms that embed an IPv4 address (``::ffff:10.0.0.1``, 6to4) are judged by the
    address they embed. ``is_global`` alone misses multicast and, before Python 3.13,
    some embedded and reserved forms; the other flags cover those.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _get(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress | None, limits: ImageLimits):
    """A streamed GET of ``url`` that leaves redirects to the caller.

    The connection goes to the address that was checked, so a DNS answer that changes
    after the check (rebinding) cannot point it into the private network. The name
    still travels in the Host header and, for https, as the TLS server name, against
    which the certificate is verified.
    """
    headers, extensions = {}, {}
    if address is not None:
        headers["Host"] = url.netloc.decode("ascii")
        if url.scheme == "https":
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        url = url.copy_with(host=str(address))
    return client.stream(
        "GET",
        url,
        headers=headers,
        extensions=extensions,
        timeout=limits.fetch_timeout_s,
        follow_redirects=False,
    )


async def _read_image(response: httpx.Response, limits: ImageLimits, param: str) -> bytes:
    if response.status_code != 200:
        raise _invalid(f"Fetching the image failed with HTTP {response.status_code}.", param)
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limits.max_bytes:
            raise _too_big(limits, param)
        chunks.append(chunk)
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


def _forbidden_url(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="image_url_forbidden")


def _too_big(limits: ImageLimits, param: str) -> APIError:
    message = f"The image is larger than {limits.max_bytes >> 20} MB."
    return APIError(413, message, param=param, code="image_too_large")


def _too_many_pixels(limits: ImageLimits, param: str, size: str = "") -> APIError:
    message = f"The image{size} has more than {limits.max_pixels / 1e6:.0f} million pixels; downscale it."
    return APIError(413, message, param=param, code="image_too_large")
