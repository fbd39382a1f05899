"""``run_batch``: one job, the same from Python and from ``fastvlm batch``.

    summary = fastvlm.run_batch(["photos/"], "captions.parquet", prompt="Describe the image.")
    summary = fastvlm.run_batch(["table.jsonl"], "out.jsonl", ray="auto", workers=4)

Everything the user can get wrong is checked before the model loads (one-line
``InputError``); after that every row ends up in the output, with ``error`` set when it
failed, and the job returns a ``BatchSummary``. Rerunning a job does only the rows the
output lacks.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..api import build_request, image_message
from ..errors import InputError
from .inputs import iter_rows, open_inputs, plan
from .options import BatchOptions, image_load_options, load_model
from .output import PartWriter, check_output, done_ids
from .structured import Extraction

_COMMIT_S = 10.0  # a part file at least this often, so a kill loses little work


@dataclass
class BatchSummary:
    output: str
    done: int = 0  # rows answered by this run
    failed: int = 0  # rows written with an error by this run
    skipped: int = 0  # rows already in the output
    seconds: float = 0.0  # the job after loading (local mode) or from Ray start (Ray mode)
    load_seconds: float = 0.0
    first_row_seconds: float = 0.0  # from the start of ``seconds`` to the first row
    mode: str = "local"
    rows_per_node: dict[str, int] = field(default_factory=dict)  # Ray mode: where rows ran

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"batch: {self.done} done, {self.failed} failed, {self.skipped} skipped as already done; "
            f"{self.images_per_s:.2f} images/s over {self.seconds:.1f} s -> {self.output}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


class Recorder:
    """Receives result rows: writes them, commits a part now and then, counts, shows progress."""

    def __init__(self, writer: PartWriter, summary: BatchSummary, total: int, opts: BatchOptions) -> None:
        from tqdm.auto import tqdm

        self.writer, self.summary, self.commit_every = writer, summary, opts.commit_every
        progress = opts.progress
        self.bar = tqdm(total=total, unit="img", desc="batch", disable=not progress, file=sys.stderr)
        self.started = self.last_commit = time.perf_counter()

    def __call__(self, row: dict[str, Any]) -> None:
        self.writer.add(row)
        if row.get("error") is None:
            self.summary.done += 1
        else:
            self.summary.failed += 1
        self.bar.update(1)
        if not self.summary.first_row_seconds:
            self.summary.first_row_seconds = time.perf_counter() - self.started
        now = time.perf_counter()
        if len(self.writer.pending) >= self.commit_every or now - self.last_commit >= _COMMIT_S:
            self.writer.commit()
            self.last_commit = now

    def close(self) -> None:
        self.writer.commit()
        self.bar.close()
        self.summary.seconds = time.perf_counter() - self.started


def run_batch(inputs: list[str] | str, output: str | os.PathLike, **options: Any) -> BatchSummary:
    """Answer a prompt about every image of ``inputs``; rows go to ``output``.

    ``options`` are the fields of ``BatchOptions`` (the ``fastvlm batch`` flags). Returns
    the summary; raises InputError (one line) for a mistake found before the job starts.
    """
    try:
        opts = BatchOptions(inputs=inputs, output=str(output), **options)
    except TypeError as exc:
        raise InputError(f"run_batch: {exc}") from None
    if opts.ray:
        from .ray_job import require_ray

        require_ray()
    out = check_output(opts.output)
    build_request(image_message(None, opts.prompt), **opts.generation)  # bad options fail now
    sources = open_inputs(list(opts.inputs), opts.columns)
    done = done_ids(out)
    todo, skipped = plan(sources, done)
    summary = BatchSummary(output=str(out), skipped=skipped, mode="ray" if opts.ray else "local")
    if todo == 0:
        return summary
    rows = iter_rows(sources, done)
    extra = Extraction.from_generation(opts.generation).arrow_types()
    recorder = Recorder(PartWriter(out, extra), summary, todo, opts)
    try:
        if opts.ray:
            from .ray_job import run_ray

            run_ray(opts, rows, recorder, recorder.summary.rows_per_node)
        else:
            _run_local(opts, rows, recorder)
    finally:
        recorder.close()
    return summary


def _run_local(opts: BatchOptions, rows, recorder: Recorder) -> None:
    from .local import run_local

    started = time.perf_counter()
    vlm = load_model(opts)
    recorder.summary.load_seconds = time.perf_counter() - started
    recorder.started = time.perf_counter()
    run_local(
        vlm.engine,
        rows,
        default_prompt=opts.prompt,
        generation=opts.generation,
        load_options=image_load_options(vlm.processor, opts),
        rules=vlm.processor.settings.rgb_rules,
        emit=recorder,
    )
