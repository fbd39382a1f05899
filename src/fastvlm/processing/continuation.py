"""Options of the processor's text path, and ``continue_final_message``.

``continue_final_message`` renders a conversation whose last message stays open, so
the model continues it (e.g. a prefilled assistant answer). As in transformers, a tag
is appended to the last text part before rendering and the prompt is cut where the
tag lands, which drops whatever the template writes after the message (``<|im_end|>``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@dataclass(frozen=True)
class RenderOptions:
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextOptions:
    """How prompts become ids: tensor type, padding, truncation, special tokens."""

    return_tensors: str | None = "pt"
    padding: Any = True
    truncation: Any = False
    max_length: int | None = None
    add_special_tokens: bool = False


def mark_final_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose last text part ends with the continuation tag."""
    if not messages:
        raise InputError("continue_final_message is set but the conversation is empty")
    marked = copy.deepcopy(messages)
    for part in reversed(marked[-1]["content"]):
        if part.get("type") == "text":
            part["text"] = part["text"] + _TAG
            return marked
    raise InputError("continue_final_message is set but the final message has no text to continue")


def cut_at_final_message(prompt: str) -> str:
    """The rendered prompt up to the end of the final message's text."""
    at = prompt.rfind(_TAG.strip())
    if at < 0:
        raise InputError(
            "continue_final_message is set but the chat template dropped the final message's text; "
            "check the template"
        )
    # If the template trimmed the tag's trailing space, it may have trimmed the message's too.
    return prompt[:at] if prompt[at : at + len(_TAG)] == _TAG else prompt[:at].rstrip()
