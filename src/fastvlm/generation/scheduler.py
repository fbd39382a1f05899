"""Who waits and who runs where: the waiting queue and the packed cache rows.

Running sequences occupy cache rows 0..B-1 in order (``running[i].row == i``), so a
decode step always covers one contiguous block of rows. When a sequence finishes,
a survivor from the end moves into its row. The scheduler knows no tensors: moving
a row's keys is the ``move_row`` callback's job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import InputError
from .sequence import Sequence


class Scheduler:
    def __init__(self, max_batch: int, prefill_per_step: int, move_row: Callable[[int, int], None]) -> None:
        self.max_batch = max_batch
        self.prefill_per_step = prefill_per_step
        self._move_row = move_row
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._tracked: dict[str, Sequence] = {}  # waiting and running, by request id

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._tracked:
            raise InputError(f"request id {seq.request_id!r} is already in use; pick another")
        self.waiting.append(seq)
        self._tracked[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        return self._tracked.get(request_id)

    def live(self) -> list[Sequence]:
        """Every sequence not yet finished: waiting, being admitted or running."""
        return [s for s in self._tracked.values() if not s.finished]

    def to_cancel(self) -> list[Sequence]:
        """Live sequences whose cancellation was asked for."""
        return [s for s in [*self.waiting, *self.running] if s.cancel_requested and not s.finished]

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill now: at most ``prefill_per_step``, even when idle.

        Prefilling everything that waits before the first decode step would hold back
        every stream's first token until the last prompt is in; admitting a few per
        step lets early requests start streaming while later ones are prefilled.
        """
        free = self.max_batch - len(self.running)
        n = min(free, self.prefill_per_step)
        return [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]

    def next_row(self) -> int:
        return len(self.running)

    def start(self, seq: Sequence) -> None:
        """``seq`` was prefilled into ``next_row()`` and goes on decoding."""
        assert seq.row == len(self.running) < self.max_batch
        self.running.append(seq)

    def release_finished(self) -> list[Sequence]:
        """Forget finished sequences and repack the rows; returns those forgotten."""
        self.waiting = deque(s for s in self.waiting if not s.finished)
        alive = [s for s in self.running if not s.finished]
        free = sorted(s.row for s in self.running if s.finished and s.row < len(alive))
        movers = [s for s in alive if s.row >= len(alive)]
        for seq, dst in zip(movers, free, strict=True):
            self._move_row(seq.row, dst)
            seq.row = dst
        self.running = sorted(alive, key=lambda s: s.row)
        done = [s for s in self._tracked.values() if s.finished]
        for seq in done:
            del self._tracked[seq.request_id]
        return done
