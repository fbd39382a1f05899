"""Generated ids -> the text a client may see: whole characters, stop strings cut.

Two things can make fresh text unsafe to emit: a UTF-8 character still missing bytes
(handled by the processor's ``StreamDecoder``) and a tail that might grow into a stop
string (held back here). The pieces this returns, joined, are the final text exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..processing.tokenizer import StreamDecoder
from .stopping import find_stop, holdback_start


class TextStream:
    """Feed generated ids one at a time; each call returns text safe to show (maybe "")."""

    def __init__(self, decode: Callable[..., str], stops: Sequence[str] = ()) -> None:
        """``decode(ids, skip_special_tokens=...) -> str`` is the tokenizer's decode."""
        self._decoder = StreamDecoder(decode, skip_special_tokens=True)
        self._stops = list(stops)
        self._pending = ""  # decoded but held back: it may be the start of a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._accept(self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        """At the end of generation: release what was held back (nothing after a stop)."""
        if self.stopped:
            return ""
        return self._accept(self._decoder.flush(), final=True)

    def _accept(self, new: str, *, final: bool) -> str:
        buffer = self._pending + new
        cut = find_stop(buffer, self._stops)
        if cut is not None:
            self.stopped = True
            out, self._pending = buffer[:cut], ""
        else:
            keep = len(buffer) if final else holdback_start(buffer, self._stops)
            out, self._pending = buffer[:keep], buffer[keep:]
        self.text += out
        return out
