"""What one engine step hands out: new text per request, and each request's end.

The invariant lives here: a request's finished event is made when the scheduler
forgets it, which happens exactly once, so every request gets exactly one finished
event (stopped, cut at its length, cancelled or failed), whatever failed in the step.
"""

from __future__ import annotations

from .request import StreamEvent
from .sequence import Sequence


class StepOutput:
    def __init__(self) -> None:
        self._pieces: dict[str, list[str]] = {}
        self._seqs: list[Sequence] = []  # in the order they first produced something

    def emit(self, seq: Sequence, text: str) -> None:
        """Record ``text`` (maybe "") as new output of ``seq`` in this step."""
        if seq.request_id not in self._pieces:
            self._pieces[seq.request_id] = []
            self._seqs.append(seq)
        self._pieces[seq.request_id].append(text)

    def events(self, released: list[Sequence]) -> list[StreamEvent]:
        """One event per request that produced text or ended; ``released`` are those the
        scheduler forgot in this step: each ends here and nowhere else."""
        for seq in released:
            self.emit(seq, "")
        ended = {s.request_id for s in released}
        return [self._event(seq, seq.request_id in ended) for seq in self._seqs]

    def _event(self, seq: Sequence, ended: bool) -> StreamEvent:
        text = "".join(self._pieces[seq.request_id])
        logprobs = seq.new_logprobs()
        if not ended:
            return StreamEvent(request_id=seq.request_id, text=text, logprobs=logprobs)
        result = seq.result()
        return StreamEvent(seq.request_id, text, True, result, seq.error, logprobs=logprobs)
