"""ASGI middleware that runs before any route: API key, body size, response counting.

Plain ASGI rather than ``BaseHTTPMiddleware``, so streamed responses pass through
untouched and a client's disconnect still reaches the route.
"""

from __future__ import annotations

import hmac

from .errors import APIError
from .metrics import Metrics

OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


class Guard:
    """Refuse unauthenticated or oversized requests, and count /v1 responses by status."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            send = self._counting(send)
        headers = dict(scope.get("headers") or [])
        error = self._check(headers, path)
        if error is None and (b"content-length" not in headers or b"transfer-encoding" in headers):
            # A chunked body's size is known only as it arrives: read it here, under the cap.
            # With both headers the server frames the body as chunked, so Content-Length
            # says nothing about its size.
            messages = await _read_body(receive, self.max_body_bytes)
            if messages is None:
                error = self._too_large()
            else:
                receive = _replaying(messages, receive)
        if error is not None:
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _counting(self, send):
        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(message["status"])
            await send(message)

        return counting_send

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
        return APIError(
            413, f"The request body is larger than {self.max_body_bytes >> 20} MB.", code="request_too_large"
        )


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
