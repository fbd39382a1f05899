"""What the Python API hands back: the engine's result plus the answer as a value.

With a constraint (``json_schema=``, ``regex=``, ``choices=``) an answer that completed
is also given parsed: the decoded JSON, or the text for a regex or a choice.
``parsed`` is None without a constraint, and when the answer did not complete (cut by
``max_new_tokens``, finish_reason "length", or by a stop string): then ``text`` is what
was produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from .generation.constraint_spec import OutputConstraint
from .generation.request import GenerationResult, StreamEvent


@dataclass
class ChatResult(GenerationResult):
    parsed: Any = None


class Answer(str):
    """``ask``'s answer: the text itself, with ``parsed`` and ``finish_reason`` beside it."""

    parsed: Any
    finish_reason: str

    def __new__(cls, result: ChatResult) -> Answer:
        answer = super().__new__(cls, result.text)
        answer.parsed, answer.finish_reason = result.parsed, result.finish_reason
        return answer


def parse_answer(result: GenerationResult, constraint: OutputConstraint | None) -> Any:
    """The completed answer as a value, or None (no constraint, cut short, or unparsable)."""
    if constraint is None or result.finish_reason != "stop":
        return None
    try:
        return constraint.parse(result.text)
    except ValueError:  # a stop string cut the JSON short
        return None


def with_parsed(result: GenerationResult, constraint: OutputConstraint | None) -> ChatResult:
    values = {f.name: getattr(result, f.name) for f in fields(result)}
    values.pop("parsed", None)
    return ChatResult(**values, parsed=parse_answer(result, constraint))


def events_with_parsed(
    events: Iterator[StreamEvent], constraint: OutputConstraint | None
) -> Iterator[StreamEvent]:
    """The events unchanged, except that the final one's result gets ``parsed``."""
    try:
        for event in events:
            if event.result is not None:
                event.result = with_parsed(event.result, constraint)
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # closing early frees the request's cache row
