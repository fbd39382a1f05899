"""The per-row code both modes share: preprocess a row, run rows through an engine, report.

A job is three stages, as in Ray's batch-inference pattern: preprocess (read and decode
one row's image; runs in a thread pool locally, in Ray tasks on a cluster), the model
(an ``Engine`` kept full by ``EngineDriver``), and the result row. Any failure of one
row becomes that row's ``error``; nothing here stops a job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..api import build_request, image_message
from ..errors import FastVLMError
from ..processing.images import ImageLoadOptions, RGBRules, load_rgb_image
from .inputs import Row
from .structured import Extraction

# Pillow names the in-memory file it failed on ("<_io.BytesIO object at 0x7f...>"); the
# address differs per run, and an error must read the same in every run and mode.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass
class Prepared:
    """A row after preprocessing: its decoded RGB image, or the reason it has none."""

    id: str
    image: str | None
    prompt: str
    rgb: Image.Image | None = None
    error: str | None = None
    request: Any = None  # the engine's PreparedRequest once ``prepare_request`` ran


def preprocess(row: Row, default_prompt: str, options: ImageLoadOptions, rules: RGBRules) -> Prepared:
    """Read and decode ``row``'s image exactly as the processor would decode it from a file."""
    prompt = row.prompt or default_prompt
    if row.source is None:
        return Prepared(row.id, row.image, prompt, error=f"row {row.id!r} names no image")
    try:
        rgb = load_rgb_image(row.source, options, rules, f"image {row.id!r}")
    except FastVLMError as exc:
        return Prepared(row.id, row.image, prompt, error=_stable(str(exc)))
    except Exception as exc:  # whatever else one file can do must not stop the job
        return Prepared(row.id, row.image, prompt, error=f"image {row.id!r}: {type(exc).__name__}: {exc}")
    # Handed over as a PIL image, a leftover transparency key would be composited onto
    # white; decoded from the file it is ignored. Drop it so both give the same pixels.
    rgb.info.pop("transparency", None)
    return Prepared(row.id, row.image, prompt, rgb=rgb)


def prepare_request(engine, item: Prepared, generation: dict[str, Any]) -> Prepared:
    """Template, tokenise, resize and crop ``item`` for ``engine`` (any thread), so that the
    thread that runs the model only queues it; a row that cannot run gets its error here."""
    if item.error is not None:
        return item
    try:
        request = build_request(image_message(item.rgb, item.prompt), **generation)
        item.request = engine.prepare(request)
    except FastVLMError as exc:  # prompt too long, image unusable, ...
        item.error = _stable(str(exc))
    item.rgb = None  # the prepared request holds the (compact) pixels now
    return item


def _stable(message: str) -> str:
    return _OBJECT_REPR.sub("", message)


def result_row(item: Prepared, result: Any = None, error: str | None = None) -> dict[str, Any]:
    """One output row; ``result`` is a GenerationResult, or None when the row failed."""
    row = {"id": item.id, "image": item.image, "prompt": item.prompt, "error": error}
    if result is None:
        return {**row, "text": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None}
    usage = result.usage
    return {
        **row,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


class EngineDriver:
    """Feeds prepared rows to an ``Engine`` and turns its finished requests into result rows.

    Uses only the engine's public surface: ``add_request`` / ``add_prepared``, ``step``, ``has_work``,
    ``num_running``/``num_waiting``, ``max_batch``; a ``GenerationError`` (a failed model
    step) fails the rows it names and the rest go on.
    """

    def __init__(self, engine, generation: dict[str, Any]) -> None:
        self.engine, self.generation = engine, generation
        self.extraction = Extraction.from_generation(generation)  # a constrained job's extra columns
        self.in_flight: dict[str, Prepared] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.in_flight) or self.engine.has_work

    def room(self) -> int:
        """Rows to add now so that the next admission finds one waiting (keeps the batch full)."""
        return self.engine.max_batch + 1 - (self.engine.num_running + self.engine.num_waiting)

    def add(self, item: Prepared) -> dict[str, Any] | None:
        """Queue ``item``; returns its result row at once if it cannot run."""
        if item.error is not None:
            return {**result_row(item, error=item.error), **self.extraction.values(None)}
        try:
            if item.request is not None:  # prepared off this thread (local mode's pool)
                request_id = self.engine.add_prepared(item.request)
            else:
                request = build_request(image_message(item.rgb, item.prompt), **self.generation)
                request_id = self.engine.add_request(request)
        except FastVLMError as exc:  # unreadable image, prompt too long, ...
            return {**result_row(item, error=str(exc)), **self.extraction.values(None)}
        item.rgb = item.request = None  # the engine holds the pixels now
        self.in_flight[request_id] = item
        return None

    def step(self) -> list[dict[str, Any]]:
        """One engine step; the result rows of the requests that finished in it."""
        from ..generation.engine import GenerationError

        try:
            events = self.engine.step()
        except GenerationError as exc:
            failed = [self._finish(i, error=str(exc)) for i in exc.request_ids if i in self.in_flight]
            rows = failed + self._finished(exc.events)
        else:
            rows = self._finished(events)
        if not self.engine.has_work:  # never wait on a request the engine no longer holds
            rows += [self._finish(i, error="the engine dropped this row") for i in list(self.in_flight)]
        return rows

    def _finished(self, events: list) -> list[dict[str, Any]]:
        rows = []
        for event in events:
            if event.finished and event.request_id in self.in_flight:
                error = getattr(event, "error", None)  # engines that report failures as events
                rows.append(self._finish(event.request_id, event.result, error and str(error)))
        return rows

    def _finish(self, request_id: str, result: Any = None, error: str | None = None) -> dict[str, Any]:
        item = self.in_flight.pop(request_id)
        if result is None and error is None:
            error = "the engine finished this row without a result"
        result = None if error else result
        return {**result_row(item, result, error), **self.extraction.values(result)}

    def run(self, items: list[Prepared]) -> list[dict[str, Any]]:
        """All of ``items`` to completion, the batch kept full as rows finish."""
        rows: list[dict[str, Any]] = []
        queue = list(reversed(items))
        while queue or self.has_work:
            while queue and self.room() > 0:
                failed = self.add(queue.pop())
                if failed is not None:
                    rows.append(failed)
            if self.has_work:
                rows += self.step()
        return rows
