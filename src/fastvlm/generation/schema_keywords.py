"""Which JSON-schema keywords constrained decoding enforces, and a check that refuses the rest.

A keyword the grammar does not enforce must never be dropped silently: the answer would
look valid and not be. llguidance refuses the validation keywords it lacks, but it
ignores unknown ones (``nullable``, ``contentEncoding``, typos, vendor ``x-`` keys), so
the schema is walked here first and anything outside these lists is an ``InputError``
naming it. Annotations (title, description, default, ...) constrain nothing and pass.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_SUBSCHEMA = frozenset({"items", "additionalProperties", "additionalItems"})
_SUBSCHEMA_LIST = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMA_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions"})
# Validation keywords llguidance enforces, with plain-value arguments.
_VALUE = frozenset(
    {
        "type", "enum", "const", "required", "$ref",
        "minLength", "maxLength", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
        "minItems", "maxItems", "minProperties", "maxProperties",
    }
)  # fmt: skip
_ANNOTATION = frozenset(
    {
        "title", "description", "default", "examples", "$comment", "$schema", "$id",
        "deprecated", "readOnly", "writeOnly",
    }
)  # fmt: skip
SUPPORTED = _SUBSCHEMA | _SUBSCHEMA_LIST | _SUBSCHEMA_MAP | _VALUE | _ANNOTATION


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise InputError naming the first keyword of ``schema`` that would not be enforced."""
    if isinstance(schema, bool):
        return  # true / false are schemas too
    if not isinstance(schema, dict):
        raise InputError(f"the JSON schema at {path} must be an object or a boolean, not {_kind(schema)}")
    for key, value in schema.items():
        here = f"{path}/{key}"
        if key not in SUPPORTED:
            raise InputError(
                f"unsupported JSON-schema keyword {key!r} at {path}: constrained decoding cannot enforce "
                "it; remove it or express it with the keywords it can (see the documentation)"
            )
        if key in _SUBSCHEMA and not (key == "items" and isinstance(value, list)):
            check_schema(value, here)
        elif key in _SUBSCHEMA_LIST or key == "items":
            for i, sub in enumerate(_as_list(value, here)):
                check_schema(sub, f"{here}/{i}")
        elif key in _SUBSCHEMA_MAP:
            for name, sub in _as_map(value, here).items():
                check_schema(sub, f"{here}/{name}")


def _as_list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise InputError(f"the JSON schema at {path} must be a list of schemas, not {_kind(value)}")
    return value


def _as_map(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"the JSON schema at {path} must be an object of schemas, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return type(value).__name__
