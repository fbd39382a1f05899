"""Convenience loops over ``Engine.step`` for in-process use (``fastvlm.load().ask``).

Each driver owns the step loop while it runs, so don't mix one with another loop
(a server's worker thread steps the engine itself). A request that fails raises its
error from the driver; closing a driver early cancels its requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from .request import GenerationRequest, GenerationResult, StreamEvent


class Drivers:
    """Mixed into ``Engine``: needs its ``add_request``, ``step`` and ``scheduler``."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` together to completion; results in the order given.

        A request that fails raises its error (the others are cancelled).
        """
        ids: list[str] = []
        results: dict[str, GenerationResult] = {}
        try:
            for request in requests:
                ids.append(self.add_request(request))
            while len(results) < len(ids):
                for event in self.step():
                    if event.finished and event.request_id in ids:
                        _raise_failure(event)
                        results[event.request_id] = event.result
        finally:
            self._abandon(set(ids) - set(results))
        return [results[i] for i in ids]

    def stream_events(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """Events of one request as it runs; the last one is finished and holds the result.

        The request is added (and checked) now, so bad input raises here, not on first
        use; a failure while it runs raises from the iterator.
        """
        return self._follow(self.add_request(request))

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text pieces of one request (complete UTF-8); joined they equal the result text."""
        return _texts(self.stream_events(request))

    def _follow(self, request_id: str) -> Iterator[StreamEvent]:
        finished = False
        try:
            while not finished:
                for event in self.step():
                    if event.request_id == request_id:
                        finished = event.finished
                        _raise_failure(event)
                        yield event
        finally:
            if not finished:
                self._abandon({request_id})

    def _abandon(self, request_ids: set[str]) -> None:
        """A driver was closed early (or failed): cancel its requests and free their rows."""
        now = time.perf_counter()
        for seq in filter(None, map(self.scheduler.get, request_ids)):
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
