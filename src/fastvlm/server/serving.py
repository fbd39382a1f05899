"""Run the app under uvicorn with limits on connections, not just on requests.

uvicorn (0.55, h11) times out an idle keep-alive connection, but a connection that
sends part of a request head and stops, or connects and sends nothing, stays open
for ever: its keep-alive timer is cancelled by the first byte and nothing else is
armed. ``HeadTimeoutH11`` adds that missing deadline; ``Guard`` (middleware) bounds
the body. ``limit_concurrency`` answers 503 beyond a number of connections, and the
request id goes into every log line.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .request_id import RequestIdFilter

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 512
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; larger heads get 400 from h11
ROOT_FORMAT = "%(levelname)s %(name)s [%(request_id)s]: %(message)s"


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float = HEAD_TIMEOUT_S  # from connecting (or the last response) to a whole request head
    keep_alive_s: int = KEEP_ALIVE_S
    max_connections: int = MAX_CONNECTIONS  # then 503 for new requests


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that leaves a request head unfinished."""

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        # A request whose head arrived in time has a cycle of its own, still running:
        # the app (and Guard's body deadline) decide about it.
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(
    app, *, host: str, port: int, log_level: str = "info", limits: ConnectionLimits | None = None
) -> uvicorn.Config:
    limits = limits or ConnectionLimits()
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"head_timeout_s": limits.head_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        log_level=log_level,
        log_config=logging_config(),
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        lifespan="on",
    )


def serve(
    app, *, host: str, port: int, log_level: str = "info", limits: ConnectionLimits | None = None
) -> None:
    """Serve until interrupted (what ``fastvlm serve`` runs)."""
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, limits=limits)
    tag_root_handlers(log_level)
    uvicorn.Server(config).run()


def logging_config() -> dict:
    """uvicorn's logging setup (its own loggers only), with the request id in every line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    for formatter in config["formatters"].values():
        formatter["fmt"] = formatter["fmt"].replace("%(levelprefix)s", "%(levelprefix)s [%(request_id)s]", 1)
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    return config


def tag_root_handlers(log_level: str = "info") -> None:
    """Put the request id into the lines of the root handlers, where ``fastvlm.*`` logs go.

    Done when serving, not when configuring: a process that only builds the app (a
    test, an embedding application) keeps its logging as it was.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=log_level.upper())
    for handler in root.handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(ROOT_FORMAT))
