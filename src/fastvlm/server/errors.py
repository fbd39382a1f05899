"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every way a request can fail ends up here, so a client always gets a 4xx (or, for a
fault of our own, a 500) with a JSON body it can parse, never FastAPI's default 422
or an HTML page. Handlers raise ``APIError``; ``install_error_handlers`` maps the
framework's own exceptions onto it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, FastVLMError
from .request_id import HEADER, REQUEST_ID

log = logging.getLogger("fastvlm.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    408: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """A failure to report to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_input_error(exc: FastVLMError, param: str | None = "messages") -> APIError:
    """The engine's and processor's one-line errors become 400s."""
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return APIError(400, str(exc), param=param, code=code)


def _validation_error(request: Request, exc: RequestValidationError) -> APIError:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and not (media == "application/json" or media.endswith("+json")):
        # FastAPI reads a body as JSON only when the header says so; otherwise pydantic
        # would complain about the shape of something the client never meant.
        given = f"'{media}'" if media else "none"
        return APIError(
            400,
            f"The request body must be JSON, sent with 'Content-Type: application/json' (got {given}).",
            code="invalid_content_type",
        )
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"The request body is not valid JSON ({reason}).", code="invalid_json")
    # With unions each branch reports; the deepest location is the most specific one.
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    param = _param(first.get("loc", ())) or None
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid request')}", param=param, code="invalid_value")


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str:
    """("body", "messages", 0, "content", "list[...]", 1, "text", "text") -> "messages[0].content[1].text".

    pydantic puts union branches ("str", "list[...]") and the tag of a discriminated
    union (repeating the next field for our parts) into locations; neither is a field.
    """
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES))]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i + 1 >= len(parts) or parts[i + 1] != part:
            out += f".{part}" if out else str(part)
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(request, exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # This handler runs outside the middleware that tags responses: tag this one here.
        headers = {HEADER: REQUEST_ID.get()}
        error = APIError(
            500, f"Internal error: {type(exc).__name__}.", code="internal_error", headers=headers
        )
        return error.response()
