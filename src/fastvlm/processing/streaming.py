"""Incremental detokenisation: ids in, text pieces out, never half a character.

Byte-level BPE tokens can end in the middle of a UTF-8 character (emoji, CJK), and
decoding such a prefix gives U+FFFD. The decoder re-decodes a short window of recent
ids and only emits text once it no longer ends in U+FFFD, the approach of
text-generation-inference's ``decode_token``.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"
_MAX_CHAR_TOKENS = 4


class StreamDecoder:
    """Feed ids with ``push``; each call returns the new complete text (maybe "").

    ``decode`` is a function ``(ids, skip_special_tokens=...) -> str``, such as
    ``Qwen2Tokenizer.decode``. Call ``flush`` at the end to get text held back.
    """

    def __init__(self, decode: Callable[..., str], *, skip_special_tokens: bool = True):
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window used to decode
        self._read_offset = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        seen = self._decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        text = self._decode(window, skip_special_tokens=self._skip)
        pending = len(self._ids) - self._read_offset
        # A UTF-8 character spans at most 4 bytes (so at most 4 byte-level tokens); past
        # that, a trailing U+FFFD is real output, not a character still being formed.
        incomplete = text.endswith(REPLACEMENT_CHAR) and pending < _MAX_CHAR_TOKENS
        if len(text) <= len(seen) or (incomplete and not final):
            return ""
        # The window's first ids give context (a leading space, a joined character);
        # only what follows the already-emitted part is new.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(seen) :]
