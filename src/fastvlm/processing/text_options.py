"""Options of the processor's text path: rendering, ``continue_final_message``, and the
check that truncation left every image whole.

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


def check_image_tokens(
    prompts: list[str], sequences: list[list[int]], marker: str, token_id: int, per_image: int
):
    """A truncation that cut image placeholders would feed the model part of an image."""
    per_text = [p.count(marker) * per_image for p in prompts]
    per_ids = [s.count(token_id) for s in sequences]
    if per_text != per_ids:
        raise InputError(
            f"truncation would cut image tokens (the prompts need {per_text} image tokens, "
            f"{per_ids} are left); disable truncation or increase max_length"
        )


def check_markers(prompts: list[str], image_counts: list[int], marker: str, batched: bool) -> None:
    """Each rendered prompt has one marker per image part (text must not smuggle in more)."""
    for index, (prompt, images) in enumerate(zip(prompts, image_counts, strict=True)):
        if prompt.count(marker) != images:
            where = f"conversation {index}: " if batched else ""
            raise InputError(
                f"{where}the conversation has {images} image part(s) but its prompt has "
                f"{prompt.count(marker)} {marker!r} marker(s); remove {marker!r} from the message text"
            )
