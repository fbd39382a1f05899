"""The one thread that owns the engine; HTTP handlers talk to it through queues.

The engine is synchronous and not thread-safe, and a model step can take from
milliseconds to seconds. So nothing on the event loop touches it: a handler
``submit``s a request and reads a ``Ticket``, an asyncio queue the worker fills with
``loop.call_soon_threadsafe``. A request's life:

    submit -> prepared in a small thread pool (template, tokenizer, image decoding:
    never on the engine thread, where it would stall every running stream)
    -> engine thread: add_prepared / cancel -> engine.step -> post events

so new requests join the running batch between decode steps (continuous batching).
A request with ``n`` choices gets a finished event per choice; the last of them, or
``Rejected``, or ``Failed`` (one failed choice fails the request and cancels the
others) is the ticket's final item: it gives the slot back then, in ``_close``. The worker never dies of an
engine error: it fails the affected requests, logs the traceback and keeps serving.
It knows nothing about HTTP or tensors.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from ..errors import FastVLMError
from .metrics import Metrics
from .tickets import Accepted, Failed, Rejected, Ticket, failure

__all__ = ["Accepted", "EngineWorker", "Failed", "QueueFull", "Rejected", "Ticket", "failure"]

log = logging.getLogger("fastvlm.server")

PREPARE_THREADS = 2
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """Every running slot and queue place is taken."""


class _ShuttingDown(Exception):
    """A request arrived as the preparation pool closed."""


class EngineWorker:
    def __init__(
        self,
        engine,
        *,
        max_queue: int,
        metrics: Metrics | None = None,
        prepare_threads: int = PREPARE_THREADS,
    ) -> None:
        self.engine = engine
        self.max_batch = int(getattr(engine, "max_batch", 1))
        self.capacity = self.max_batch + max_queue
        self.metrics = metrics or Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[str, Ticket] = {}  # worker thread only
        self._lock = threading.Lock()
        self._active = 0  # submitted and not yet finished; guarded by _lock
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="fastvlm-prepare")
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
        """Queue ``request`` for preparation and then the engine, or raise QueueFull."""
        with self._lock:
            if self._active >= self.capacity or self._stopping.is_set():
                raise QueueFull
            self._active += 1
        ticket = Ticket(loop, choices=request.n)
        try:
            future = self._pool.submit(self.engine.prepare, request)
        except RuntimeError:  # the pool is shut down
            future = Future()
            future.set_exception(_ShuttingDown())
        # Whatever becomes of it (done, failed, cancelled at shutdown), the engine thread hears.
        future.add_done_callback(lambda f: self._commands.put(("add", (f, ticket))))
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
                self._fail_all(Failed("internal error in the engine worker", 500, "internal_error"))
        self._shut_down()

    def _shut_down(self) -> None:
        """Answer everyone still waiting, so no handler hangs on a ticket."""
        self._pool.shutdown(wait=True, cancel_futures=True)  # every future now has its "add" queued
        self._fail_all(Failed(SHUTTING_DOWN))
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._close(payload[1], Failed(SHUTTING_DOWN))

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

    def _add(self, prepared: Future, ticket: Ticket) -> None:
        """Queue a prepared request in the engine, or answer its ticket with why not."""
        if ticket.cancelled:
            self._close(ticket, None)
            return
        try:
            if self._stopping.is_set():
                raise _ShuttingDown
            request_id = self.engine.add_prepared(prepared.result())
        except FastVLMError as exc:
            self._close(ticket, Rejected(exc))
            self.metrics.request_rejected()
            return
        except (_ShuttingDown, CancelledError):
            self._close(ticket, Failed(SHUTTING_DOWN))
            return
        except Exception as exc:  # a bug of ours: not the client's fault
            log.error("preparing a request failed unexpectedly", exc_info=exc)
            self._close(ticket, failure(exc))
            self.metrics.request_failed()
            return
        ticket.request_id = request_id
        self._tickets[request_id] = ticket
        ticket.post(Accepted(request_id))

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.closed or ticket.cancelled:
            return
        ticket.cancelled = True  # still being prepared: _add closes it
        if ticket.request_id is None:
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
        except Exception as exc:  # the engine fails requests through events; this is a bug
            log.error("engine.step raised; failing every request in flight", exc_info=exc)
            self._fail_all(Failed("the engine failed while generating; please retry"))
            return
        self.metrics.observe_step(batch=self.engine.num_running + sum(e.finished for e in events))
        for event in events:
            ticket = self._tickets.get(event.request_id)
            if ticket is None:  # cancelled: its handler is gone
                continue
            if not event.finished:
                ticket.post(event)
            elif event.error is not None:
                self._choice_failed(ticket, event)
            else:
                ticket.results.append(event.result)
                if len(ticket.results) < ticket.choices:
                    ticket.post(event)
                    continue
                del self._tickets[event.request_id]
                self._close(ticket, event)
                self.metrics.request_finished(ticket.results)

    def _choice_failed(self, ticket: Ticket, event) -> None:
        """One failed choice fails its request: the other choices are cancelled."""
        del self._tickets[event.request_id]
        if len(ticket.results) + 1 < ticket.choices:
            try:
                self.engine.cancel(event.request_id)
            except Exception:
                log.exception("engine.cancel failed")
        answer = failure(event.error)
        if answer.status >= 500:
            log.error("request %s failed", event.request_id, exc_info=event.error)
        answer.text = event.text
        answer.index = event.index
        self._close(ticket, answer)
        self.metrics.request_failed()

    def _fail_all(self, answer: Failed) -> None:
        for request_id in list(self._tickets):
            ticket = self._tickets.pop(request_id)
            try:
                self.engine.cancel(request_id)
            except Exception:
                log.exception("engine.cancel failed")
            self._close(ticket, answer)
            self.metrics.request_failed()

    def _close(self, ticket: Ticket, last: Any) -> None:
        """Post the ticket's final item and give its slot back: the only place that does."""
        if ticket.closed:
            return
        ticket.closed = True
        if last is not None:
            ticket.post(last)
        with self._lock:
            self._active -= 1

    def _publish(self) -> None:
        cache = getattr(self.engine, "feature_cache", None)
        self.metrics.set_engine(
            running=self.engine.num_running,
            active=self.active,
            stats=dict(getattr(self.engine, "stats", {}) or {}),
            cache=(len(cache), cache.nbytes, cache.max_bytes) if cache is not None else None,
        )
