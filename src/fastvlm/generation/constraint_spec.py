"""What shape an answer must take: a JSON object, a JSON schema, a regex or a fixed choice.

Plain data only, like the rest of a request: no grammar library is imported here, so a
server can build and compare constraints without knowing how they are enforced
(``constraints`` compiles them). A schema keyword that cannot be enforced is refused
here already; what only the compiler finds (a bad regex or format) fails in
``Engine.prepare``. A constraint is immutable and hashable; its schema is
kept as a private copy, so changing the caller's dict afterwards changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InputError
from .schema_keywords import check_schema

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice"]
_KINDS = ("json_object", "json_schema", "regex", "choice")


@dataclass(frozen=True)
class OutputConstraint:
    kind: ConstraintKind
    schema: dict | None = None  # json_schema only
    pattern: str | None = None  # regex only
    choices: tuple[str, ...] = ()  # choice only

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"constraint kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        if self.kind == "json_schema":
            object.__setattr__(self, "schema", _schema_copy(self.schema))
            check_schema(self.schema)  # here, so a keyword that cannot be enforced fails at once
        if self.kind == "regex" and (not isinstance(self.pattern, str) or not self.pattern):
            raise InputError("regex must be a non-empty string")
        if self.kind == "choice":
            choices = (self.choices,) if isinstance(self.choices, str) else tuple(self.choices or ())
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise InputError("choices must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choices", tuple(dict.fromkeys(choices)))

    # -- constructors ---------------------------------------------------------------
    @classmethod
    def json_object(cls) -> OutputConstraint:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | type) -> OutputConstraint:
        """A JSON value valid under ``schema`` (a dict, or a pydantic model class)."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()  # pydantic v2, without importing pydantic here
        return cls("json_schema", schema=schema)

    @classmethod
    def regex(cls, pattern: str) -> OutputConstraint:
        """Text that matches ``pattern`` as a whole (Rust ``regex`` syntax: no look-around)."""
        return cls("regex", pattern=pattern)

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> OutputConstraint:
        """Exactly one of ``choices``."""
        return cls("choice", choices=tuple(choices) if not isinstance(choices, str) else (choices,))

    @classmethod
    def from_options(
        cls,
        json_schema: dict | type | None = None,
        regex: str | None = None,
        choices: list[str] | None = None,
    ) -> OutputConstraint | None:
        """The constraint the keyword options ask for (at most one of them), or None."""
        given = [n for n, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices)) if v]
        if len(given) > 1:
            raise InputError(f"pick one of json_schema, regex and choices, not {' and '.join(given)}")
        if json_schema is not None:
            return cls.json_schema(json_schema)
        if regex is not None:
            return cls.regex(regex)
        if choices is not None:
            return cls.choice(choices)
        return None

    # -- use --------------------------------------------------------------------------
    @property
    def is_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")

    def parse(self, text: str) -> Any:
        """The answer as a value: decoded JSON for the JSON kinds, the text itself otherwise.

        Raises ValueError when JSON text does not parse (an answer cut by its budget).
        """
        return json.loads(text) if self.is_json else text

    @property
    def cache_key(self) -> tuple:
        schema = json.dumps(self.schema, sort_keys=True) if self.schema is not None else None
        return (self.kind, schema, self.pattern, self.choices)

    def __hash__(self) -> int:  # the schema dict is not hashable; its canonical text is
        return hash(self.cache_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputConstraint) and self.cache_key == other.cache_key


def _schema_copy(schema: Any) -> dict:
    """A private deep copy of a JSON schema, which must be a JSON object."""
    if not isinstance(schema, dict):
        raise InputError(
            "a JSON schema must be a JSON object (a dict or a pydantic model class), "
            f"not {type(schema).__name__}"
        )
    try:
        return json.loads(json.dumps(schema))
    except (TypeError, ValueError) as exc:
        raise InputError(f"the JSON schema is not plain JSON: {exc}") from None
