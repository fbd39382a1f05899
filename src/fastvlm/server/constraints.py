"""The shape a request asks its answer to take -> the engine's ``OutputConstraint``.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's
``guided_json``, ``guided_regex`` and ``guided_choice``: at most one per request.
Here a constraint is checked for shape and size only; whether it can be enforced is
the grammar compiler's call (``Policy.check_constraint``, the engine's own compiler,
whose result the engine then finds in its cache), and a keyword it cannot enforce is a
400 naming that keyword and the field that carried it, never a silent downgrade.
``strict: false`` is accepted: the schema is enforced all the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..errors import InputError
from ..generation.constraint_spec import OutputConstraint
from .errors import APIError
from .schemas import ChatCompletionRequest

# Compiling is linear in the schema's size; a request body could carry megabytes of it.
MAX_CONSTRAINT_CHARS = 100_000


def output_constraint(body: ChatCompletionRequest) -> tuple[OutputConstraint | None, str | None]:
    """The request's constraint and the field it came from; (None, None) for free text."""
    asked = _asked(body)
    if len(asked) > 1:
        names = " and ".join(param for param, _ in asked)
        raise APIError(
            400,
            f"{names} each constrain the answer; send only one of them.",
            param=asked[1][0],
            code="invalid_value",
        )
    if not asked:
        return None, None
    param, build = asked[0]
    try:
        constraint = build()
    except InputError as exc:
        raise APIError(400, f"'{param}': {exc}", param=param, code="invalid_value") from None
    _check_size(constraint, param)
    return constraint, param


def _asked(body: ChatCompletionRequest) -> list[tuple[str, Callable[[], OutputConstraint]]]:
    asked: list[tuple[str, Callable[[], OutputConstraint]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", OutputConstraint.json_object))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.json_schema
        asked.append(("response_format", lambda: OutputConstraint.json_schema(schema)))
    if body.guided_json is not None:
        schema = _schema_of(body.guided_json)
        asked.append(("guided_json", lambda: OutputConstraint.json_schema(schema)))
    if body.guided_regex is not None:
        pattern = body.guided_regex
        asked.append(("guided_regex", lambda: OutputConstraint.regex(pattern)))
    if body.guided_choice is not None:
        choices = body.guided_choice
        asked.append(("guided_choice", lambda: OutputConstraint.choice(choices)))
    return asked


def _schema_of(value: dict | str) -> dict:
    """vLLM takes ``guided_json`` as a schema or as its JSON text."""
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise APIError(
            400, f"'guided_json' is not valid JSON ({exc}).", param="guided_json", code="invalid_value"
        ) from None
    if not isinstance(schema, dict):
        raise APIError(
            400, "'guided_json' must be a JSON schema object.", param="guided_json", code="invalid_value"
        )
    return schema


def _check_size(constraint: OutputConstraint, param: str) -> None:
    size = len(json.dumps(constraint.schema)) if constraint.schema is not None else 0
    size += len(constraint.pattern or "") + sum(len(c) for c in constraint.choices)
    if size > MAX_CONSTRAINT_CHARS:
        raise APIError(
            400,
            f"'{param}' has {size} characters; at most {MAX_CONSTRAINT_CHARS} are accepted.",
            param=param,
            code="invalid_value",
        )


def compile_error(exc: InputError, param: str) -> APIError:
    """A constraint the grammar compiler refused: the message names the keyword or feature."""
    return APIError(400, f"'{param}': {exc}", param=param, code="invalid_value")
