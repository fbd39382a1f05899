"""What a batch job reads: folders, globs and tables turned into rows (id, image, prompt).

A row only names its image (a resolved path, a URL, or the bytes a table held); nothing
here decodes pixels, so listing a million-row job costs names, not images. Every mistake
the user can fix before the job starts (no such input, no images, unknown column,
duplicate ids) is an ``InputError`` raised here; a problem with one row's image is left
for that row to report.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_FORMATS = (".jsonl", ".csv", ".parquet")
_URL_PREFIXES = ("http://", "https://", "data:", "file://")


@dataclass(frozen=True)
class Columns:
    """Which table columns hold the image, the prompt and the id (None: the row number)."""

    image: str = "image"
    prompt: str = "prompt"
    id: str | None = None
    prompt_given: bool = False  # --prompt-column was passed, so the column must exist


@dataclass(frozen=True)
class Row:
    """One input. ``source`` is what to read: a path, a URL, bytes, or None when missing."""

    id: str
    image: str | None  # as given, for the output; None when the table held the bytes
    source: str | bytes | None
    prompt: str | None  # None: the job's default prompt


class FileList:
    """The image files of a folder (recursive, by extension) or a glob, in sorted order."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        if Path(spec).is_dir():
            root = Path(spec)
            files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            files = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        else:
            raise InputError(f"no such input {spec!r}; pass a folder, a glob or a .jsonl/.csv/.parquet table")
        self.entries = sorted((p.relative_to(root).as_posix(), str(p)) for p in files)

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self) -> Iterator[str]:
        return (rel for rel, _ in self.entries)

    def rows(self) -> Iterator[Row]:
        return (Row(rel, path, str(Path(path).resolve()), None) for rel, path in self.entries)


class Table:
    """A .jsonl, .csv or .parquet file with one row per image."""

    def __init__(self, path: Path, columns: Columns) -> None:
        self.path, self.columns, self.spec = path, columns, str(path)
        self.length: int | None = None
        names = self._column_names()
        wanted = [("--image-column", columns.image), ("--id-column", columns.id)]
        if columns.prompt_given:
            wanted.append(("--prompt-column", columns.prompt))
        for flag, name in wanted:
            if name is not None and name not in names:
                shown = ", ".join(map(repr, names[:20])) or "none"
                raise InputError(f"{path} has no column {name!r} (its columns: {shown}); pass {flag} NAME")

    def __len__(self) -> int:
        if self.length is None:  # a text table is read once to count it, not once per use
            if self.path.suffix == ".parquet":
                self.length = _parquet_file(self.path).metadata.num_rows
            else:
                self.length = sum(1 for _ in self._records())
        return self.length

    def ids(self) -> Iterator[str]:
        if self.columns.id is None:
            return (str(i) for i in range(len(self)))
        records = enumerate(self._records([self.columns.id]))
        return (_id(r.get(self.columns.id), self.path, i) for i, r in records)

    def rows(self) -> Iterator[Row]:
        c = self.columns
        wanted = [n for n in (c.image, c.prompt, c.id) if n is not None]
        for index, record in enumerate(self._records(wanted)):
            ident = str(index) if c.id is None else _id(record.get(c.id), self.path, index)
            image, source = self._image(record.get(c.image))
            prompt = record.get(c.prompt)
            yield Row(ident, image, source, prompt if isinstance(prompt, str) and prompt else None)

    def _image(self, cell: Any) -> tuple[str | None, str | bytes | None]:
        """(as given, what to read) for one image cell."""
        if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
            if cell.get("bytes"):
                return cell.get("path"), bytes(cell["bytes"])
            cell = cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return None, bytes(cell)
        if not isinstance(cell, str) or not cell.strip():
            return None if cell is None else str(cell), None
        if cell.strip()[:8].lower().startswith(_URL_PREFIXES):
            return cell, cell.strip()
        path = Path(cell)
        return cell, str(path if path.is_absolute() else (self.path.parent / path).resolve())

    def _column_names(self) -> list[str]:
        if self.path.suffix == ".parquet":
            return list(_parquet_file(self.path).schema_arrow.names)
        first = next(self._records(), None)
        if first is None:
            raise InputError(f"{self.path} has no rows; check the file")
        return list(first)

    def _records(self, columns: list[str] | None = None) -> Iterator[dict]:
        suffix = self.path.suffix
        if suffix == ".parquet":
            yield from _parquet_records(self.path, columns)
        elif suffix == ".csv":
            with open(self.path, newline="", encoding="utf-8") as f:
                yield from csv.DictReader(f)
        else:
            yield from _jsonl_records(self.path)


Source = FileList | Table


def open_inputs(specs: list[str], columns: Columns) -> list[Source]:
    """One source per INPUT; raises InputError if one is missing or yields no images."""
    if not specs:
        raise InputError("pass at least one INPUT: a folder, a glob or a .jsonl/.csv/.parquet table")
    sources: list[Source] = []
    for spec in specs:
        path = Path(spec)
        if path.suffix.lower() in TABLE_FORMATS and path.is_file():
            source: Source = Table(path, columns)
        elif path.is_file():
            raise InputError(f"{spec} is a file but not a table; tables end in {', '.join(TABLE_FORMATS)}")
        else:
            source = FileList(spec)
        if len(source) == 0:
            raise InputError(f"no images found in {spec!r}; image files end in {_extensions()}")
        sources.append(source)
    return sources


def plan(sources: list[Source], done: set[str]) -> tuple[int, int]:
    """(rows to run, rows already done); raises InputError on a duplicate id."""
    seen: set[str] = set()
    todo = skipped = 0
    for source in sources:
        for ident in source.ids():
            if ident in seen:
                raise InputError(
                    f"id {ident!r} appears twice (again in {source.spec}); ids must be unique: "
                    "pass --id-column, or give each INPUT its own folder names"
                )
            seen.add(ident)
            if ident in done:
                skipped += 1
            else:
                todo += 1
    return todo, skipped


def iter_rows(sources: list[Source], done: set[str]) -> Iterator[Row]:
    """Every row not already done, in input order."""
    for source in sources:
        for row in source.rows():
            if row.id not in done:
                yield row


def _id(value: Any, path: Path, index: int) -> str:
    if value is None or value == "":
        raise InputError(f"{path} row {index} has no id; fill the id column or drop --id-column")
    return str(value)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ids are relative to it."""
    parts = Path(pattern).parts
    fixed = list(_until_magic(parts))
    return Path(*fixed) if fixed else Path(".")


def _until_magic(parts: tuple[str, ...]) -> Iterator[str]:
    for part in parts[:-1]:
        if glob.has_magic(part):
            return
        yield part


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise InputError(f"cannot read {path} as Parquet ({str(exc).splitlines()[0][:200]})") from None


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[dict]:
    # Batches keep memory flat for tables that hold the images' bytes.
    for batch in _parquet_file(path).iter_batches(batch_size=64, columns=columns):
        yield from batch.to_pylist()


def _jsonl_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {number} is not valid JSON ({exc.msg}); fix it") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {number} is not a JSON object; write one object per line")
            yield record


def _extensions() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))
