"""Where a batch job's rows go, committed so that a job killed at any moment can resume.

``OUT.parquet`` is a folder of part files: each part is written under a hidden name
(readers skip names starting with "."), flushed to disk, then renamed into place, so a
reader sees whole parts or nothing. ``OUT.jsonl`` is one file that only ever grows by
whole lines; a line torn by a kill is cut off when the job resumes. Finished rows are
never rewritten: a resumed job reads the ids already present and adds the rest.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..errors import InputError

COLUMNS = ("id", "image", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
FORMATS = (".parquet", ".jsonl")


def arrow_schema(extra: dict[str, str] | None = None):
    """The output's columns; ``extra`` adds columns by arrow type name (see batch.structured)."""
    import pyarrow as pa

    string, integer = pa.string(), pa.int64()
    types = (string, string, string, string, string, integer, integer, string)
    fields = list(zip(COLUMNS, types, strict=True))
    for name, kind in (extra or {}).items():
        fields.append((name, pa.string() if kind == "json" else pa.type_for_alias(kind)))
    return pa.schema(fields)


def check_output(out: str | os.PathLike) -> Path:
    """The output path, or InputError if its format cannot be written there."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"cannot write {str(out)!r}: the output must end in .parquet or .jsonl")
    if path.suffix.lower() == ".parquet" and path.is_file():
        raise InputError(
            f"{path} is a single Parquet file; a resumable job writes a folder of part files, "
            "so pass a new path (or the folder of an earlier run)"
        )
    if path.suffix.lower() == ".jsonl" and path.is_dir():
        raise InputError(f"{path} is a folder; .jsonl output is one file, so pass a file path")
    if not path.parent.is_dir():
        raise InputError(f"the output's folder {str(path.parent)!r} does not exist; create it first")
    return path


class PartWriter:
    """Appends result rows to OUT; ``commit()`` makes the rows written so far durable."""

    def __init__(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """``extra``: further columns by arrow type name (a constrained job's parsed values)."""
        self.path, self.extra = path, dict(extra or {})
        self.columns = (*COLUMNS, *self.extra)
        self.parquet = path.suffix.lower() == ".parquet"
        self.pending: list[dict[str, Any]] = []
        self.committed = 0
        if self.parquet:
            path.mkdir(exist_ok=True)
            for stale in path.glob(".tmp-part-*"):  # parts a killed job never committed
                stale.unlink(missing_ok=True)
        else:
            _cut_torn_line(path)

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append({name: row.get(name) for name in self.columns})

    def commit(self) -> None:
        if not self.pending:
            return
        if self.parquet:
            self._write_part()
        else:
            self._append_lines()
        self.committed += len(self.pending)
        self.pending = []

    def _write_part(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.path / f".tmp-{name}"
        pq.write_table(pa.Table.from_pylist(self.pending, schema=arrow_schema(self.extra)), tmp)
        _fsync(tmp)
        os.replace(tmp, self.path / name)  # atomic: the part appears whole or not at all
        _fsync_dir(self.path)

    def _append_lines(self) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.pending).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def done_ids(path: Path) -> set[str]:
    """Ids of the rows already in OUT (none if it does not exist yet)."""
    if not path.exists():
        return set()
    if path.suffix.lower() == ".jsonl":
        return {row["id"] for row in _jsonl_rows(path)}
    import pyarrow.parquet as pq

    parts = sorted(path.glob("part-*.parquet"))
    return {i for part in parts for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()}


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a torn last line is not a row yet
                rows.append(json.loads(line))
    return rows


def _cut_torn_line(path: Path) -> None:
    """Drop a last line a killed job left half-written, so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)  # 0 when the only line is torn


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass
