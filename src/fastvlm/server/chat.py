"""``POST /v1/chat/completions``: submit to the worker, then answer in one body or as SSE.

The handler waits for the worker's verdict on the request (accepted, or refused with
the engine's one-line reason) before it sends a status line, so a bad request gets a
4xx even with ``stream: true``. A client that leaves cancels its request (all its
choices): the worker frees the slot at the next engine step. With ``n`` choices the
events of all of them arrive interleaved, each tagged with its choice's index; the
answer is complete once every choice has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError, from_input_error
from .responses import DONE, Completion, finish_reason, sse
from .schemas import ChatCompletionRequest
from .tickets import Failed, Rejected, Ticket
from .translate import Policy, to_generation_request
from .worker import EngineWorker, QueueFull

DISCONNECT_POLL_S = 1.0
CLIENT_CLOSED = 499  # nginx's code for a request whose client left; never actually seen by it


@dataclass
class ServerState:
    worker: EngineWorker
    policy: Policy
    http: httpx.AsyncClient | None = None


async def chat_completion(request: Request, body: ChatCompletionRequest, state: ServerState) -> Response:
    if state.worker.full:  # refuse before spending time on images; submit checks again
        raise _busy()
    generation = await to_generation_request(body, state.policy, state.http)
    try:
        ticket = state.worker.submit(generation, asyncio.get_running_loop())
    except QueueFull:
        raise _busy() from None
    try:
        verdict = await ticket.get()
    except asyncio.CancelledError:
        state.worker.cancel(ticket)
        raise
    if isinstance(verdict, Rejected):
        raise from_input_error(verdict.error)
    if isinstance(verdict, Failed):
        raise _failed(verdict)
    completion = Completion(model=state.policy.served_model_name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(ticket, completion, include_usage)
        return EventStream(events, on_close=lambda: state.worker.cancel(ticket))
    return await _collect(request, ticket, completion, state.worker)


def _busy() -> APIError:
    return APIError(
        429, "The server is at capacity; retry shortly.", code="queue_full", headers={"Retry-After": "1"}
    )


def _failed(item: Failed) -> APIError:
    """A request the engine could not serve: 400, 500, or 503 (retry) as the worker says."""
    headers = {"Retry-After": "1"} if item.status == 503 else None
    return APIError(item.status, item.message, code=item.code, headers=headers)


async def _collect(
    request: Request, ticket: Ticket, completion: Completion, worker: EngineWorker
) -> Response:
    """Wait for every choice to finish, cancelling the request if the client hangs up meanwhile."""
    pending = asyncio.ensure_future(_finished(ticket))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                worker.cancel(ticket)
                return Response(status_code=CLIENT_CLOSED)
    finally:
        if not pending.done():
            pending.cancel()
    outcome = pending.result()
    if isinstance(outcome, Failed):
        raise _failed(outcome)
    return JSONResponse(completion.body(outcome))


async def _finished(ticket: Ticket) -> list | Failed:
    """The results of all the request's choices, or why it failed."""
    results = []
    while True:
        item = await ticket.get()
        if isinstance(item, Failed):
            return item
        if item.finished:
            results.append(item.result)
            if len(results) == ticket.choices:
                return results


async def _stream(ticket: Ticket, completion: Completion, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict, index: int, **kwargs) -> bytes:
        return sse(completion.chunk(delta, index=index, with_usage=include_usage, **kwargs))

    for index in range(ticket.choices):
        yield chunk({"role": "assistant", "content": ""}, index)
    results = []
    while True:
        item = await ticket.get()
        if isinstance(item, Failed):
            if item.text:
                yield chunk({"content": item.text}, item.index)
            yield sse(_failed(item).body())
            break
        if item.text or item.logprobs:
            yield chunk({"content": item.text}, item.index, logprobs=item.logprobs)
        if item.finished:
            results.append(item.result)
            yield chunk({}, item.index, reason=finish_reason(item.result.finish_reason))
            if len(results) == ticket.choices:
                if include_usage:
                    yield sse(completion.usage_chunk(results))
                break
    yield DONE


class EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends.

    Starlette stops iterating when the client disconnects (or a send fails); the
    callback is what tells the worker, so the request's batch slot is freed.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
