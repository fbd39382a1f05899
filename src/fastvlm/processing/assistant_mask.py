"""``return_assistant_tokens_mask``: which prompt tokens a chat template marks as the
assistant's (its ``{% generation %}`` blocks), the way transformers decides it.

A token belongs to a block when its text starts inside the block's character span. As in
transformers, a block whose first character falls inside a token (not at its start)
marks nothing, and a block cut off by truncation marks what is left of it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from .text_options import TextOptions
from .tokenizer import Qwen2Tokenizer, as_tensors


def token_offsets(
    tokenizer: Qwen2Tokenizer, prompt: str, marker: str, per_image: int
) -> list[tuple[int, int]]:
    """(start, end) characters in ``prompt`` of each id the processor encodes it to: the
    text between image markers token by token, each marker as ``per_image`` copies."""
    offsets: list[tuple[int, int]] = []
    start = 0
    for index, chunk in enumerate(prompt.split(marker)):
        if index:
            offsets += [(start - len(marker), start)] * per_image
        encoding = tokenizer.backend_tokenizer.encode(chunk, add_special_tokens=False)
        offsets += [(start + a, start + b) for a, b in encoding.offsets]
        start += len(chunk) + len(marker)
    return offsets


def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose text starts in one of ``spans``, else 0."""
    starts = [start for start, _ in offsets]
    mask = [0] * len(offsets)
    for span_start, span_end in spans:
        first = bisect_left(starts, span_start)
        if first == len(offsets) or not offsets[first][0] <= span_start < offsets[first][1]:
            continue
        for index in range(first, bisect_left(starts, span_end)):
            mask[index] = 1
    return mask


def pad_masks(masks: list[list[int]], length: int, side: str) -> list[list[int]]:
    """Masks padded with 0 to ``length`` on ``side``, like the ids they belong to."""
    fill = [[0] * (length - len(m)) for m in masks]
    return [f + m if side == "left" else m + f for f, m in zip(fill, masks, strict=True)]


def build_assistant_masks(
    tokenizer: Qwen2Tokenizer,
    prompts: list[str],
    spans: list[list[tuple[int, int]]],
    marker: str,
    per_image: int,
    text: TextOptions,
    length: int,
) -> Any:
    """The ``assistant_masks`` of a batch, cut and padded exactly like its ``input_ids``."""
    specials = len(tokenizer.encode("", add_special_tokens=True)) if text.add_special_tokens else 0
    masks = [
        [0] * specials + assistant_mask(token_offsets(tokenizer, prompt, marker, per_image), prompt_spans)
        for prompt, prompt_spans in zip(prompts, spans, strict=True)
    ]
    if text.truncation not in (False, None, "do_not_truncate"):
        masks = tokenizer.truncate(masks, text.truncation, text.max_length)
    return as_tensors(pad_masks(masks, length, tokenizer.padding_side), text.return_tensors)
