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
        error = self._check(scope, path)
        counted = path.startswith("/v1/")
        if error is not None:
            if counted:
                self.metrics.http_response(error.status)
            return await error.response()(scope, receive, send)
        if not counted:
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _check(self, scope, path: str) -> APIError | None:
        headers = dict(scope.get("headers") or [])
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
            return APIError(
                413,
                f"The request body is larger than {self.max_body_bytes >> 20} MB.",
                code="request_too_large",
            )
        return None
