"""The raw bytes behind each token id of a byte-level BPE vocabulary (Qwen2's, GPT-2's).

Byte-level BPE spells every byte as one printable character (GPT-2's
``bytes_to_unicode`` table: "Ġ" is the space byte 0x20), so a token's vocabulary
string maps back to its bytes one character at a time. Added tokens (``<|im_end|>``)
are stored as plain text and are their UTF-8. A token may hold part of a UTF-8
character: its bytes are exact, its text is not, which is why ``logprobs`` report both.
"""

from __future__ import annotations

import functools


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's table, inverted: printable bytes stand for themselves, the other 68 bytes
    for the characters from U+0100 on, in byte order."""
    spans = [("!", "~"), ("¡", "¬"), ("®", "ÿ")]
    printable = [b for first, last in spans for b in range(ord(first), ord(last) + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TokenBytes:
    """``id -> (text, bytes)`` for a tokenizer with ``backend_tokenizer`` (``tokenizers``).

    Ids the tokenizer does not know (a model's padded vocabulary rows) are ("", b"").
    Looked up on demand and remembered: only tokens that logprobs report are ever built.
    """

    def __init__(self, tokenizer) -> None:
        backend = tokenizer.backend_tokenizer
        self._id_to_token = backend.id_to_token
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._memo: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._memo.get(token_id)
        if found is None:
            found = self._memo[token_id] = self._build(token_id)
        return found

    def _build(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self._added:
            raw = self._added[token_id].encode()
        else:
            table = _unicode_to_byte()
            spelled = self._id_to_token(token_id) or ""
            raw = bytes(table[ch] for ch in spelled if ch in table)
        # Part of a character: show the bytes as \xNN escapes, as OpenAI's API does.
        return raw.decode("utf-8", errors="backslashreplace"), raw
