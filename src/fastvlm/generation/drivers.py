"""Convenience loops over ``Engine.step`` for in-process use (``fastvlm.load().ask``).

Each driver owns the step loop while it runs, so don't mix one with another loop
(a server's worker thread steps the engine itself). A request that fails raises its
error from the driver; closing a driver early cancels its requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from ..errors import InputError
from .request import GenerationRequest, GenerationResult, StreamEvent


class Drivers:
    """Mixed into ``Engine``: needs its ``add_request``, ``step`` and ``scheduler``."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` together to completion; results in the order given, a
        request with ``n`` choices giving n results in index order.

        A request that fails raises its error (the others are cancelled).
        """
        keys: list[tuple[str, int]] = []
        results: dict[tuple[str, int], GenerationResult] = {}
        try:
            for request in requests:
                request_id = self.add_request(request)
                keys += [(request_id, i) for i in range(request.n)]
            wanted = set(keys)
            while len(results) < len(keys):
                for event in self.step():
                    key = (event.request_id, event.index)
                    if event.finished and key in wanted:
                        _raise_failure(event)
                        results[key] = event.result
        finally:
            self._abandon({r for r, _ in set(keys) - set(results)})
        return [results[k] for k in keys]

    def stream_events(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """Events of one request as it runs; each of its n choices (``event.index``) ends
        with one finished event holding its result, and the iterator ends after the last.

        The request is added (and checked) now, so bad input raises here, not on first
        use; a failure while it runs raises from the iterator.
        """
        return self._follow(self.add_request(request), request.n)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text pieces of one request (complete UTF-8); joined they equal the result text."""
        if request.n > 1:
            raise InputError(
                "stream() gives one answer's text; for n > 1 use stream_events (events carry index)"
            )
        return _texts(self.stream_events(request))

    def _follow(self, request_id: str, n: int) -> Iterator[StreamEvent]:
        finished = 0
        try:
            while finished < n:
                for event in self.step():
                    if event.request_id == request_id:
                        finished += event.finished
                        _raise_failure(event)
                        yield event
        finally:
            if finished < n:
                self._abandon({request_id})

    def _abandon(self, request_ids: set[str]) -> None:
        """A driver was closed early (or failed): cancel its requests and free their rows."""
        now = time.perf_counter()
        for seq in (s for r in request_ids for s in self.scheduler.choices(r)):
            if not seq.finished:
                seq.finish("cancelled", now)
        self.stats["requests_finished"] += len(self.scheduler.release_finished())


def _raise_failure(event: StreamEvent) -> None:
    if event.error is not None:
        raise event.error


def _texts(events: Iterator[StreamEvent]) -> Iterator[str]:
    try:
        for event in events:
            if event.text:
                yield event.text
    finally:
        events.close()  # closing the text stream must cancel the request at once
