"""Download an http(s) image under ``ImageLoadOptions``: public hosts only, checked hop by hop.

One implementation for everyone: the server awaits ``fetch_image`` on its event loop;
the library and the CLI call ``fetch_image_sync``, which runs the same coroutine.
Whoever resolves a name also decides where the connection goes: each hop connects
to the address that was checked (the name still travels in the Host header and, for
https, as the TLS server name the certificate is verified against).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx

from .image_source import (
    MAX_REDIRECTS,
    USER_AGENT,
    ImageLoadOptions,
    ImageSourceError,
    IPAddress,
    reason,
    too_large,
)


async def fetch_image(url: str, options: ImageLoadOptions, client: httpx.AsyncClient, where: str) -> bytes:
    """The body of ``url`` within ``options.timeout_s`` in all, at most ``options.max_bytes``."""
    if not options.allow_remote:
        raise ImageSourceError(
            where,
            "fetching remote images is disabled; send the image as a base64 data URI",
            "remote_images_disabled",
        )
    # httpx's timeout bounds each connect or read; a host trickling one byte at a time
    # would hold the caller far longer without an overall deadline.
    try:
        return await asyncio.wait_for(_fetch(url, options, client, where), options.timeout_s)
    except asyncio.TimeoutError:
        raise ImageSourceError(
            where, f"fetching the image took longer than {options.timeout_s:g} s; send it as a data URI"
        ) from None


def fetch_image_sync(url: str, options: ImageLoadOptions, where: str) -> bytes:
    """``fetch_image`` for synchronous callers, with a client of its own."""

    async def run() -> bytes:
        async with httpx.AsyncClient(headers={"User-Agent": USER_AGENT}) as client:
            return await fetch_image(url, options, client, where)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    # Called from inside an event loop (a notebook, an async app): run the fetch on a
    # loop of its own rather than fail.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


async def _fetch(url: str, options: ImageLoadOptions, client: httpx.AsyncClient, where: str) -> bytes:
    target = _parse_url(url, where)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            address = await _checked_address(target, options, where)
            async with _get(client, target, address, options) as response:
                if not response.has_redirect_location:
                    return await _read_body(response, options, where)
                target = _redirect_target(target, response.headers["location"], where)
    except (httpx.InvalidURL, UnicodeError) as exc:
        # httpx prepares the next request of a redirect itself, even when not following
        # it, and a Location such as "data:..." or "mailto:..." fails there.
        raise ImageSourceError(
            where, f"cannot fetch the image: the host redirected to an unusable URL ({reason(exc)})"
        ) from exc
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise ImageSourceError(
            where, f"cannot fetch {_short(url)} ({type(exc).__name__}: {reason(exc)}); check the URL"
        ) from exc
    raise ImageSourceError(
        where, f"the image URL redirects more than {MAX_REDIRECTS} times; link the image itself"
    )


def _parse_url(url: str, where: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
        parsed.host  # noqa: B018 (decodes an IDNA name, which can fail)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ImageSourceError(where, f"the image URL is invalid ({reason(exc)})") from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageSourceError(
            where,
            f"the image URL's scheme {parsed.scheme!r} is not fetched; use http(s)",
            "image_url_forbidden",
        )
    if parsed.userinfo:
        raise ImageSourceError(
            where,
            "image URLs with credentials (user:password@host) are not fetched; use a URL without them",
            "image_url_forbidden",
        )
    if not parsed.host:
        raise ImageSourceError(where, "the image URL has no host")
    return parsed


def _redirect_target(current: httpx.URL, location: str, where: str) -> httpx.URL:
    try:
        joined = str(current.join(location))
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ImageSourceError(where, f"the image host redirected to an invalid URL ({reason(exc)})") from exc
    return _parse_url(joined, where)


async def _checked_address(url: httpx.URL, options: ImageLoadOptions, where: str) -> IPAddress | None:
    """The public address to connect to; None when private hosts are allowed (httpx resolves)."""
    if options.allow_private_hosts:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await resolve_host(url.raw_host.decode("ascii"), port)
    except OSError as exc:  # socket.gaierror is an OSError
        raise ImageSourceError(
            where, f"cannot fetch the image: cannot resolve the host {url.host!r}"
        ) from exc
    # Every address, not just the first: a connection may try any of them.
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise ImageSourceError(
            where,
            f"cannot fetch the image: the host {url.host!r} is not a public internet host; "
            "allow private image hosts (allow_private_image_hosts=True) to fetch from it",
            "image_host_forbidden",
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


def _get(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress | None, options: ImageLoadOptions):
    """A streamed GET of ``url`` (at ``address`` when given) that leaves redirects to the caller."""
    headers, extensions = {}, {}
    if address is not None:
        headers["Host"] = url.netloc.decode("ascii")
        if url.scheme == "https":
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        url = url.copy_with(host=str(address))
    return client.stream(
        "GET", url, headers=headers, extensions=extensions, timeout=options.timeout_s, follow_redirects=False
    )


async def _read_body(response: httpx.Response, options: ImageLoadOptions, where: str) -> bytes:
    if response.status_code != 200:
        raise ImageSourceError(
            where, f"fetching the image failed with HTTP {response.status_code}; check the URL"
        )
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > options.max_bytes:
            raise too_large(options, where)
        chunks.append(chunk)
    return b"".join(chunks)


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."
