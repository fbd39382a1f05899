"""The one thread that owns the engine; HTTP handlers talk to it through queues.

The engine is synchronous and not thread-safe, and every call into it (tokenizing,
decoding images, a model step) can take from milliseconds to seconds. So nothing on
the event loop touches it: a handler ``submit``s a request and reads a ``Ticket``,
an asyncio queue the worker fills with ``loop.call_soon_threadsafe``. The loop runs

    take new commands -> engine.add_request / engine.cancel -> engine.step -> post events

so new requests join the running batch between decode steps (continuous batching).
The worker never dies of an engine error: it fails the affected requests, logs the
traceback and keeps serving. It knows nothing about HTTP or tensors.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import FastVLMError
from .metrics import Metrics

log = logging.getLogger("fastvlm.server")


class QueueFull(Exception):
    """Every running slot and queue place is taken."""


@dataclass
class Accepted:
    request_id: str


@dataclass
class Rejected:
    """``add_request`` refused the request (bad input: the handler answers 4xx)."""

    error: Exception


@dataclass
class Failed:
    """The engine broke while running the request (the handler answers 503 / an error event)."""

    message: str


@dataclass
class Ticket:
    """One request's mailbox: Accepted | Rejected first, then StreamEvents or Failed."""

    loop: asyncio.AbstractEventLoop
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: str | None = None
    closed: bool = False  # set by the worker when it will post nothing more

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass

    async def get(self) -> Any:
        return await self.inbox.get()


class EngineWorker:
    def __init__(self, engine, *, max_queue: int, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_batch = int(getattr(engine, "max_batch", 1))
        self.capacity = self.max_batch + max_queue
        self.metrics = metrics or Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[str, Ticket] = {}  # worker thread only
        self._lock = threading.Lock()
        self._active = 0  # submitted and not yet finished; guarded by _lock
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastvlm-engine", daemon=True)

    # -- called from the event loop ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request, loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue ``request`` for the engine, or raise QueueFull."""
        with self._lock:
            if self._active >= self.capacity:
                raise QueueFull
            self._active += 1
        ticket = Ticket(loop)
        self._commands.put(("add", (request, ticket)))
        self.metrics.set_active(self.active)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request whose client went away; its slot frees at the next step."""
        self._commands.put(("cancel", ticket))

    @property
    def full(self) -> bool:
        return self.active >= self.capacity

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    # -- the worker thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._take_commands(block=not self.engine.has_work)
                if self.engine.has_work:
                    self._step()
                self._publish()
            except Exception:  # a bug of ours must not kill the only thread that serves
                log.exception("engine worker loop failed; failing the running requests")
                self._fail_all("internal error in the engine worker")
        self._shut_down()

    def _shut_down(self) -> None:
        """Answer everyone still waiting, so no handler hangs on a ticket."""
        self._fail_all("the server is shutting down")
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._close(payload[1], Failed("the server is shutting down"))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "add":
                self._add(*payload)
            elif kind == "cancel":
                self._cancel(payload)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, request, ticket: Ticket) -> None:
        try:
            request_id = self.engine.add_request(request)
        except Exception as exc:
            if not isinstance(exc, FastVLMError):
                log.exception("add_request failed unexpectedly")
            self._close(ticket, Rejected(exc))
            self.metrics.request_rejected()
            return
        ticket.request_id = request_id
        self._tickets[request_id] = ticket
        ticket.post(Accepted(request_id))

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.closed or ticket.request_id is None:
            return
        try:
            self.engine.cancel(ticket.request_id)
        except Exception:
            log.exception("engine.cancel failed")
        self._tickets.pop(ticket.request_id, None)
        self._close(ticket, None)
        self.metrics.request_cancelled()

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:
            # The engine names the requests it dropped (GenerationError); the rest go on.
            dropped = getattr(exc, "request_ids", None)
            log.error("engine.step failed for %s", dropped or "all requests", exc_info=exc)
            self._fail(
                dropped if dropped is not None else list(self._tickets),
                "the engine failed while generating; please retry",
            )
            return
        self.metrics.observe_step(batch=self.engine.num_running + sum(e.finished for e in events))
        for event in events:
            ticket = self._tickets.get(event.request_id)
            if ticket is None:  # cancelled: its handler is gone
                continue
            if event.finished:
                del self._tickets[event.request_id]
                self._close(ticket, event)
                if event.result is not None:
                    self.metrics.request_finished(event.result)
            else:
                ticket.post(event)

    def _fail_all(self, message: str) -> None:
        self._fail(list(self._tickets), message)

    def _fail(self, request_ids: list[str], message: str) -> None:
        for request_id in request_ids:
            ticket = self._tickets.pop(request_id, None)
            try:
                self.engine.cancel(request_id)
            except Exception:
                log.exception("engine.cancel failed")
            if ticket is not None:
                self._close(ticket, Failed(message))
                self.metrics.request_failed()

    def _close(self, ticket: Ticket, last: Any) -> None:
        """Post the ticket's final item and give its slot back."""
        if ticket.closed:
            return
        ticket.closed = True
        if last is not None:
            ticket.post(last)
        with self._lock:
            self._active -= 1

    def _publish(self) -> None:
        running = self.engine.num_running
        self.metrics.set_engine(
            running=running,
            active=self.active,
            stats=dict(getattr(self.engine, "stats", {}) or {}),
        )
