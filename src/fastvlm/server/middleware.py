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
import re
import uuid
from contextvars import ContextVar

from .errors import APIError
from .metrics import Metrics

BODY_TIMEOUT_S = 60.0

log = logging.getLogger("fastvlm.server")

# The id of the request being handled, for log lines (see ``RequestIdFilter``).
REQUEST_ID: ContextVar[str] = ContextVar("fastvlm_request_id", default="-")
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@+=-]{1,128}")

OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` (``-`` outside a request) for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


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
        request_id = _request_id(headers.get(b"x-request-id"))
        token = REQUEST_ID.set(request_id)
        try:
            await self._handle(scope, headers, receive, self._sending(send, scope, request_id))
        finally:
            REQUEST_ID.reset(token)

    async def _handle(self, scope, headers: dict[bytes, bytes], receive, send) -> None:
        error = self._check(headers, scope.get("path", ""))
        if error is None and (b"content-length" in headers or b"transfer-encoding" in headers):
            # A chunked body's size is known only as it arrives, so the cap is applied as
            # it does; with both headers the body is framed as chunked and Content-Length
            # says nothing about its size.
            try:
                messages = await asyncio.wait_for(
                    _read_body(receive, self.max_body_bytes), self.body_timeout_s
                )
            except asyncio.TimeoutError:
                messages, error = (
                    [],
                    _closing(
                        408,
                        f"The request body did not arrive within {self.body_timeout_s:g} s.",
                        "request_timeout",
                    ),
                )
            if messages is None:
                error = self._too_large()
            else:
                receive = _replaying(messages, receive)
        if error is not None:
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _sending(self, send, scope, request_id: str):
        """``send`` that adds the x-request-id header and counts /v1 responses."""
        counted = scope.get("path", "").startswith("/v1/")

        async def tagging_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
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


def _request_id(given: bytes | None) -> str:
    """The client's x-request-id when it is a short token, else a fresh one."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


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
