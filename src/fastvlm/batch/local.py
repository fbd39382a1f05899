"""Local mode: one process; a small thread pool prepares rows ahead of one engine.

Each pool task reads and decodes a row's image and prepares its request (template,
tokens, resize, crop), so the thread that runs the model only queues prepared requests
and steps the engine.

The pool runs at most ``max_batch + threads`` rows ahead of the model, so memory stays
flat however long the collection is; the engine's continuous batching refills a row of
its batch as soon as one finishes, so the decoder stays full. Rows finish (and are
written) in the order they complete, not the order they were read.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..processing.images import ImageLoadOptions, RGBRules
from .inputs import Row
from .stages import EngineDriver, Prepared, prepare_request, preprocess


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_local(
    engine,
    rows: Iterator[Row],
    *,
    default_prompt: str,
    generation: dict[str, Any],
    load_options: ImageLoadOptions,
    rules: RGBRules,
    emit: Callable[[dict[str, Any]], None],
    threads: int | None = None,
) -> None:
    """Run every row of ``rows`` through ``engine``; ``emit`` gets each result row."""
    threads = threads or default_threads()
    driver = EngineDriver(engine, generation)
    ahead = engine.max_batch + threads  # bounds the decoded images held in memory
    pending: deque[Future[Prepared]] = deque()
    rows = iter(rows)
    exhausted = False
    with ThreadPoolExecutor(threads, thread_name_prefix="fastvlm-batch") as pool:
        while True:
            while not exhausted and len(pending) < ahead:
                row = next(rows, None)
                if row is None:
                    exhausted = True
                else:
                    task = (engine, row, default_prompt, generation, load_options, rules)
                    pending.append(pool.submit(_prepare, *task))
            # Take a row when it is ready, or wait for one when the engine has nothing to do.
            while pending and driver.room() > 0 and (pending[0].done() or not driver.has_work):
                failed = driver.add(pending.popleft().result())
                if failed is not None:
                    emit(failed)
            if driver.has_work:
                for result in driver.step():
                    emit(result)
            elif exhausted and not pending:
                return


def _prepare(engine, row: Row, default_prompt: str, generation: dict[str, Any], options, rules) -> Prepared:
    return prepare_request(engine, preprocess(row, default_prompt, options, rules), generation)
