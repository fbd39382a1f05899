"""The id of the request being handled: echoed in ``x-request-id`` and put in log lines.

``Guard`` (middleware) sets it for each request; it lives in the request's own task
context, so it is still set when an error handler runs for that request.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

HEADER = "x-request-id"
REQUEST_ID: ContextVar[str] = ContextVar("fastvlm_request_id", default="-")
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@+=-]{1,128}")


def request_id(given: bytes | None) -> str:
    """The client's id when it is a short token, else a fresh one."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` (``-`` outside a request) for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True
