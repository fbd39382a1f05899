"""When a request stops: stop token ids and stop strings, as pure functions.

Stop strings are searched in decoded text, so they match however the tokenizer
happened to split them. While streaming, text that could still become a stop string
is held back (``holdback_start``): a client must never see the start of a stop
string that later turns out to complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Qwen2 chat checkpoints end a turn with <|im_end|>; base ones emit <|endoftext|>.
CHAT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def default_stop_token_ids(eos_token_id: int | Sequence[int] | None, token_to_id) -> list[int]:
    """The checkpoint's eos id(s) plus the chat stop tokens the tokenizer knows, deduplicated.

    ``token_to_id`` maps a token string to its id or None (``tokenizer.convert_tokens_to_ids``).
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    chat = [token_to_id(t) for t in CHAT_STOP_TOKENS]
    return list(dict.fromkeys(int(i) for i in [*eos, *chat] if i is not None))


def find_stop(text: str, stops: Iterable[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def holdback_start(text: str, stops: Sequence[str]) -> int:
    """Smallest index from which ``text``'s tail is a proper prefix of some stop string.

    Returns ``len(text)`` when no tail could start a stop string, so ``text[:i]`` is
    always safe to emit. Call it only after ``find_stop`` found nothing.
    """
    if not stops:
        return len(text)
    longest = max(len(s) for s in stops)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stops):
            return start
    return len(text)
