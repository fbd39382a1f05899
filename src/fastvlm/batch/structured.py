"""A batch job's constrained answers as columns: ``parsed`` and one column per top-level property.

With ``--json-schema``/``--regex``/``--choice`` every row gets ``parsed``: the answer's
JSON (as compact text) for a schema, the text for a regex or a choice, and null when the
answer did not complete (cut by ``--max-new-tokens``). A schema for an object adds a
column per top-level property, typed from the schema (string, integer, number, boolean;
anything else holds JSON text), so a collection is extracted straight into a table. A
property whose name is already a column (``id``, ``text``, ...) is named ``parsed_NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..generation.constraint_spec import OutputConstraint
from ..results import parse_answer
from .output import COLUMNS as BASE_COLUMNS

_ARROW_TYPES = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}


@dataclass(frozen=True)
class Extraction:
    """The extra columns of a job and how to fill them from one result."""

    constraint: OutputConstraint | None = None
    properties: tuple[tuple[str, str, str], ...] = ()  # (column, property, arrow type name)

    @classmethod
    def from_generation(cls, generation: dict[str, Any]) -> Extraction:
        """From the job's ``vlm.ask`` options (``json_schema``, ``regex``, ``choices``)."""
        keys = ("json_schema", "regex", "choices")
        constraint = OutputConstraint.from_options(**{k: generation.get(k) for k in keys})
        if constraint is None:
            return cls()
        return cls(constraint, _property_columns(constraint.schema or {}))

    @property
    def columns(self) -> tuple[str, ...]:
        if self.constraint is None:
            return BASE_COLUMNS
        return (*BASE_COLUMNS, "parsed", *(column for column, _, _ in self.properties))

    def arrow_types(self) -> dict[str, str]:
        """Arrow type name of each extra column ("json": JSON text in a string column)."""
        if self.constraint is None:
            return {}
        return {"parsed": "string", **{column: kind for column, _, kind in self.properties}}

    def values(self, result: Any) -> dict[str, Any]:
        """The extra columns of one row; ``result`` is a GenerationResult or None (a failed row)."""
        if self.constraint is None:
            return {}
        empty = {column: None for column in ("parsed", *(c for c, _, _ in self.properties))}
        parsed = None if result is None else parse_answer(result, self.constraint)
        if parsed is None:
            return empty
        text = json.dumps(parsed, ensure_ascii=False) if self.constraint.is_json else parsed
        row = {**empty, "parsed": text}
        if isinstance(parsed, dict):
            for column, name, kind in self.properties:
                row[column] = _cell(parsed.get(name), kind)
        return row


def _property_columns(schema: dict) -> tuple[tuple[str, str, str], ...]:
    properties = schema.get("properties") if schema.get("type", "object") == "object" else None
    if not isinstance(properties, dict):
        return ()
    taken = {*BASE_COLUMNS, "parsed"}
    columns = []
    for name, sub in properties.items():
        column = f"parsed_{name}" if name in taken else name
        taken.add(column)
        columns.append((column, name, _arrow_type(sub)))
    return tuple(columns)


def _arrow_type(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "json"
    kind = schema.get("type")
    if kind in _ARROW_TYPES:
        return _ARROW_TYPES[kind]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "string"
    return "json"  # objects, arrays, unions: the value as JSON text


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if kind == "float64":
        return float(value)
    return value
