"""Validate a chat conversation and split it into what the template sees and the images.

Input is what the transformers docs show for FastVLM: ``[{"role": ..., "content": ...}]``
where content is a string or a list of parts:

* ``{"type": "text", "text": str}``;
* ``{"type": "image", "image" | "url" | "path" | "base64": source}``;
* ``{"type": "image_url", "image_url": {"url": str} | str}`` (OpenAI style).

The template gets plain data only: every image part becomes ``{"type": "image"}``, a
string content becomes one text part. Nothing here decodes images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

_IMAGE_KEYS = ("image", "url", "path", "base64")


@dataclass
class ImageRef:
    """One image part: its source (None if the part names none) and where it was."""

    source: Any
    where: str


@dataclass
class ParsedConversation:
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)


def is_batch(conversation: Any) -> bool:
    """A batch is a list of conversations, i.e. a list whose items are lists."""
    return (
        isinstance(conversation, Sequence)
        and not isinstance(conversation, (str, bytes))
        and len(conversation) > 0
        and isinstance(conversation[0], Sequence)
        and not isinstance(conversation[0], (str, bytes, Mapping))
    )


def parse_conversation(conversation: Any, prefix: str = "") -> ParsedConversation:
    """Check ``conversation`` and return template messages plus image references.

    ``prefix`` goes in front of error locations ("conversation 2, ").
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise InputError(
            f"{prefix}a conversation must be a list of messages, not {type(conversation).__name__}"
        )
    if not conversation:
        raise InputError(f"{prefix}the conversation is empty; send at least one message")
    parsed = ParsedConversation()
    for index, message in enumerate(conversation):
        where = f"{prefix}message {index}"
        if not isinstance(message, Mapping):
            raise InputError(f"{where}: a message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f"{where}: 'role' must be a non-empty string such as 'user'")
        parts = _parse_content(message.get("content"), where, parsed.images)
        extras = {
            k: v
            for k, v in message.items()
            if k not in ("role", "content") and v is not None and _is_plain(v)
        }
        parsed.messages.append({**extras, "role": role, "content": parts})
    return parsed


def _parse_content(content: Any, where: str, images: list[ImageRef]) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise InputError(f"{where}: 'content' must be a string or a list of parts")
    parts = []
    for index, part in enumerate(content):
        part_where = f"{where}, part {index}"
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, Mapping):
            raise InputError(f"{part_where}: a content part must be a dict with a 'type'")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InputError(f"{part_where}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": text})
        elif kind in ("image", "image_url"):
            images.append(ImageRef(_image_source(part, kind, part_where), part_where))
            parts.append({"type": "image"})
        else:
            raise InputError(f"{part_where}: unknown content type {kind!r}; use 'text' or 'image'")
    return parts


def _image_source(part: Mapping, kind: str, where: str) -> Any:
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str):
            raise InputError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
        return url
    for key in _IMAGE_KEYS:
        if part.get(key) is not None:
            value = part[key]
            if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
                return "data:;base64," + value
            return value
    return None  # allowed when only rendering; the processor complains if it needs pixels


def _is_plain(value: Any) -> bool:
    """JSON-like data only: templates are untrusted and must not reach live objects."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False
