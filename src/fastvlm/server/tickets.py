"""What the engine worker tells a request's handler: its verdict, its events, its end.

A ``Ticket`` is one request's mailbox, filled from the worker thread and read on the
event loop. ``failure`` is the one mapping of engine errors to HTTP statuses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextLengthError, FastVLMError
from ..generation.engine import GenerationError
from ..generation.sampling import NonFiniteLogitsError


@dataclass
class Accepted:
    request_id: str


@dataclass
class Rejected:
    """Preparation refused the request (bad input: the handler answers 4xx)."""

    error: FastVLMError


@dataclass
class Failed:
    """The request could not be served; ``status`` is the HTTP status it maps to.

    400: its content turned out unusable only while it ran; 503: model compute failed
    (retry); 500: a bug of ours (the traceback is in the log).
    """

    message: str
    status: int = 503
    code: str = "engine_error"
    text: str = ""  # what the request's last step produced before it failed (streams show it)
    index: int = 0  # the choice that failed


@dataclass
class Ticket:
    """One request's mailbox: Accepted | Rejected | Failed first, then StreamEvents of
    all its choices; the last item is the last choice's finished event, Rejected or Failed."""

    loop: asyncio.AbstractEventLoop
    choices: int = 1  # finished events to wait for, one per choice
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    results: list = field(default_factory=list)  # of the finished choices; worker thread only
    request_id: str | None = None
    cancelled: bool = False  # the client left; worker thread only
    closed: bool = False  # the final item was posted; worker thread only

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass

    async def get(self) -> Any:
        return await self.inbox.get()


def failure(error: BaseException) -> Failed:
    """How a request's error reaches its client: the one mapping of errors to statuses."""
    if isinstance(error, FastVLMError):
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else "invalid_value"
        return Failed(str(error), 400, code)
    if isinstance(error, GenerationError):
        return Failed("the engine failed while generating; please retry", 503, "engine_error")
    if isinstance(error, NonFiniteLogitsError):  # a retry would only repeat it
        message = "the model's scores for this request became NaN or infinite; try other sampling settings"
        return Failed(message, 500, "non_finite_logits")
    return Failed(f"internal error ({type(error).__name__}); see the server log", 500, "internal_error")
