"""ASGI middleware that runs before any route: request ids, API key, body size and
deadline, response counting.

Plain ASGI rather than ``BaseHTTPMiddleware``, so streamed responses pass through
untouched and a client's disconnect still reaches the route. The whole body is read
here, under the size cap and one deadline, so a client that sends half a body and
waits holds nothing for long.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from .errors import APIError
from .metrics import Metrics
from .request_id import HEADER, REQUEST_ID, request_id

BODY_TIMEOUT_S = 60.0

log = logging.getLogger("fastvlm.server")


OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


class Guard:
    """Tag each request with an id; refuse unauthenticated, oversized or stalled requests;
    count /v1 responses by status."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = request_id(headers.get(HEADER.encode()))
        # Not reset afterwards: the value lives in this request's task, where the
        # framework's last-resort error handler (outside this middleware) still reads it.
        REQUEST_ID.set(given)
        await self._handle(scope, headers, receive, self._sending(send, scope, given))

    async def _handle(self, scope, headers: dict[bytes, bytes], receive, send) -> None:
        error = self._check(headers, scope.get("path", ""))
        if error is None and (b"content-length" in headers or b"transfer-encoding" in headers):
            receive, error = await self._buffered(receive)
        if error is not None:
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    async def _buffered(self, receive) -> tuple[Any, APIError | None]:
        """A ``receive`` that replays the whole body, read under the cap and the deadline; or the error.

        A chunked body's size is known only as it arrives, so the cap is applied as it
        does; with both headers the body is framed as chunked and Content-Length says
        nothing about its size.
        """
        try:
            messages = await asyncio.wait_for(_read_body(receive, self.max_body_bytes), self.body_timeout_s)
        except asyncio.TimeoutError:
            message = f"The request body did not arrive within {self.body_timeout_s:g} s."
            return receive, _closing(408, message, "request_timeout")
        if messages is None:
            return receive, self._too_large()
        return _replaying(messages, receive), None

    def _sending(self, send, scope, given_id: str):
        """``send`` that adds the x-request-id header and counts /v1 responses."""
        counted = scope.get("path", "").startswith("/v1/")

        async def tagging_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (HEADER.encode(), given_id.encode())],
                }
                if counted:
                    self.metrics.http_response(message["status"])
                log.debug("%s %s -> %d", scope.get("method"), scope.get("path"), message["status"])
            await send(message)

        return tagging_send

    def _check(self, headers: dict[bytes, bytes], path: str) -> APIError | None:
        if self.api_key and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return APIError(
                    401,
                    "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        # Refused before the body was read to its end: close rather than read the rest.
        return _closing(
            413, f"The request body is larger than {self.max_body_bytes >> 20} MB.", "request_too_large"
        )


def _closing(status: int, message: str, code: str) -> APIError:
    return APIError(status, message, code=code, headers={"Connection": "close"})


async def _read_body(receive, limit: int) -> list[dict] | None:
    """The request's messages up to the end of its body; None once the body passes ``limit`` bytes."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client left mid-body; the app sees that too
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replaying(messages: list[dict], receive):
    """A ``receive`` that hands out ``messages`` first, then whatever comes next (a disconnect)."""
    pending = list(messages)

    async def replaying_receive() -> dict:
        return pending.pop(0) if pending else await receive()

    return replaying_receive
