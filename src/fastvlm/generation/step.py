"""What one engine step hands out: new text per request, and each request's end.

The invariant lives here: a choice's finished event is made when the scheduler
forgets it, which happens exactly once, so every choice of every request gets exactly
one finished event (stopped, cut at its length, cancelled or failed), whatever failed
in the step. Sequences are keyed by (request id, choice index).
"""

from __future__ import annotations

from .request import StreamEvent
from .sequence import Sequence


class StepOutput:
    def __init__(self) -> None:
        self._pieces: dict[tuple[str, int], list[str]] = {}
        self._seqs: list[Sequence] = []  # in the order they first produced something

    def emit(self, seq: Sequence, text: str) -> None:
        """Record ``text`` (maybe "") as new output of ``seq`` in this step."""
        if seq.key not in self._pieces:
            self._pieces[seq.key] = []
            self._seqs.append(seq)
        self._pieces[seq.key].append(text)

    def events(self, released: list[Sequence]) -> list[StreamEvent]:
        """One event per choice that produced text or ended; ``released`` are those the
        scheduler forgot in this step: each ends here and nowhere else."""
        for seq in released:
            self.emit(seq, "")
        ended = {s.key for s in released}
        return [self._event(seq, seq.key in ended) for seq in self._seqs]

    def _event(self, seq: Sequence, ended: bool) -> StreamEvent:
        text = "".join(self._pieces[seq.key])
        extra = {"logprobs": seq.new_logprobs(), "index": seq.index}
        if not ended:
            return StreamEvent(request_id=seq.request_id, text=text, **extra)
        return StreamEvent(seq.request_id, text, True, seq.result(), seq.error, **extra)
