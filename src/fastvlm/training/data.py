"""Training data: LLaVA-style or chat rows -> token ids with loss labels -> padded batches.

Rows are rendered by the same processor (chat template, image markers, tokenizer) that
builds inference prompts, so a fine-tuned model is asked the way it was trained. Only
assistant turns carry labels, each up to and including its end-of-turn token; every
other position is ``IGNORE``. This module knows nothing about models or optimisers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

IGNORE = -100
END_OF_TURN = "<|im_end|>"  # both checkpoint formats use Qwen2's ChatML turns
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKER = "<image>"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[str] = field(default_factory=list)  # resolved paths, in prompt order
    where: str = ""

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


# ---- reading rows ----------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs from a JSON array or a JSONL file; bad JSON names its line."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; pass --data with a JSON or JSONL file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix that line") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); fix that line") from None
    return out


def row_messages(row: Any, image_folder: Path, where: str) -> list[dict]:
    """One row (LLaVA ``conversations`` or chat ``messages``) -> chat messages with image paths."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: a row must be an object with 'conversations' or 'messages'")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise InputError(f"{where}: 'messages' must be a list")
        return [_resolve_parts(m, image_folder, where) for m in messages]
    if "conversations" in row:
        return _llava_messages(row, image_folder, where)
    raise InputError(f"{where}: a row needs 'conversations' (LLaVA style) or 'messages' (chat style)")


def _llava_messages(row: dict, image_folder: Path, where: str) -> list[dict]:
    turns = row["conversations"]
    image = row.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    images = [_image_path(p, image_folder, where) for p in images]
    if not isinstance(turns, list):
        raise InputError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns")
    messages, pending = [], list(images)
    for index, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in _ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise InputError(
                f"{where}: turn {index} needs 'from' (human, gpt or system) and a string 'value'"
            )
        text = turn["value"]
        count = text.count(_MARKER)
        if count > len(pending):
            raise InputError(f"{where}: {text.count(_MARKER)} '<image>' marker(s) but too few images")
        # LLaVA writes "<image>\nQuestion"; the template places images itself, before the text.
        text = text.replace(_MARKER + "\n", "").replace("\n" + _MARKER, "").replace(_MARKER, "").strip()
        parts = [{"type": "image", "path": p} for p in pending[:count]]
        pending = pending[count:]
        messages.append({"role": _ROLES[turn["from"]], "content": [*parts, {"type": "text", "text": text}]})
    if pending:  # images without a marker go to the first user turn
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise InputError(f"{where}: the row has an image but no human turn")
        first["content"][:0] = [{"type": "image", "path": p} for p in pending]
    return messages


def _resolve_parts(message: Any, image_folder: Path, where: str) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message  # plain strings and malformed messages: the parser reports the latter
    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") == "image":
            key = next((k for k in ("image", "path", "url") if isinstance(part.get(k), str)), None)
            if key is not None and not part[key].startswith(("http://", "https://", "data:")):
                part = {"type": "image", "path": _image_path(part[key], image_folder, where)}
        parts.append(part)
    return {**message, "content": parts}


def _image_path(name: Any, image_folder: Path, where: str) -> str:
    if not isinstance(name, str):
        raise InputError(f"{where}: 'image' must be a path string")
    path = image_folder / name
    if not path.is_file():
        raise InputError(
            f"{where}: image {name!r} not found in {image_folder}; fix the path or --image-folder"
        )
    return str(path)


# ---- tokens and labels ---------------------------------------------------------------------


def encode_messages(processor, messages: list[dict], max_length: int, where: str) -> Example:
    """Token ids and labels for one conversation, rendered by ``processor``'s template.

    Each assistant turn is located by rendering the conversation up to it twice (with
    and without that turn); the text between the two is the answer. Pieces are encoded
    separately, so an answer's tokens are the ones generation produces after the prompt.
    """
    from ..processing.messages import parse_conversation

    parsed = parse_conversation(messages, f"{where}: ")
    turns = parsed.messages
    answers = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    if not answers:
        raise InputError(f"{where}: the conversation has no assistant turn to learn from")

    def render(upto: int, prompt: bool) -> str:
        return processor.apply_chat_template(turns[:upto], tokenize=False, add_generation_prompt=prompt)

    full = render(len(turns), False)
    spans = []
    if answers[0] == 0:
        raise InputError(f"{where}: the conversation starts with an assistant turn; begin with a user turn")
    for i in answers:
        before, after = render(i, True), render(i + 1, False)
        if not (after.startswith(before) and full.startswith(after)):
            raise InputError(f"{where}: the chat template does not render turns as prefixes; cannot mask")
        answer = after[len(before) :]
        end = answer.find(END_OF_TURN)
        spans.append((len(before), len(before) + (len(answer) if end < 0 else end + len(END_OF_TURN))))
    ids, labels, cursor = [], [], 0
    for start, stop in spans:
        prompt_ids = processor.encode_prompt(full[cursor:start])
        answer_ids = processor.encode_prompt(full[start:stop])
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        cursor = stop
    # The trailing newline after the last turn teaches nothing; it is not part of the input.
    if len(ids) > max_length:
        raise InputError(f"{where}: the row is {len(ids)} tokens, over --max-length {max_length}")
    images = [str(ref.source) for ref in parsed.images]
    return Example(ids, labels, images, where)


def load_examples(
    path: Path,
    processor,
    *,
    image_folder: Path | None = None,
    max_length: int = 2048,
    skip_bad_rows: bool = False,
) -> list[Example]:
    """Every row of ``path`` encoded; a bad row stops everything unless ``skip_bad_rows``."""
    folder = image_folder if image_folder is not None else path.parent
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist; pass --image-folder")
    examples, skipped = [], []
    for where, row in read_rows(path):
        try:
            examples.append(encode_messages(processor, row_messages(row, folder, where), max_length, where))
        except InputError as exc:
            if not skip_bad_rows:
                raise InputError(f"{exc}; or pass --skip-bad-rows to leave such rows out") from None
            skipped.append(str(exc))
    if skipped:
        print(f"skipped {len(skipped)} bad row(s) of {path} (first: {skipped[0]})", file=sys.stderr)
    if not examples:
        raise InputError(f"{path} has no usable rows")
    return examples


def collate(examples: list[Example], processor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` and the batch's pixels."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [p for e in examples for p in e.images]
    if images:
        batch["pixel_values"] = processor.preprocess_images(images)  # (N, 3, H, W)
    return batch
