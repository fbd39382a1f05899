"""Who waits and who runs where: the waiting queue and the packed cache rows.

Running sequences occupy cache rows 0..B-1 in order (``running[i].row == i``), so a
decode step always covers one contiguous block of rows. When a sequence finishes,
a survivor from the end moves into its row. The scheduler knows no tensors: moving
a row's keys is the ``move_row`` callback's job.

A request with ``n`` choices is ``n`` sequences that queue together and are admitted
together (one prefill, then one row each), or not at all.
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
        # Waiting and running choices, by request id, until each has finished.
        self._tracked: dict[str, list[Sequence]] = {}

    def add(self, choices: list[Sequence]) -> None:
        """Queue the choices (1..n sequences) of one request."""
        request_id = choices[0].request_id
        if request_id in self._tracked:
            raise InputError(f"request id {request_id!r} is already in use; pick another")
        self.waiting.extend(choices)
        self._tracked[request_id] = list(choices)

    def get(self, request_id: str) -> Sequence | None:
        """The first unfinished choice of a request (the first one when all are)."""
        choices = self._tracked.get(request_id)
        if not choices:
            return None
        return next((s for s in choices if not s.finished), choices[0])

    def choices(self, request_id: str) -> list[Sequence]:
        return list(self._tracked.get(request_id, []))

    def live(self) -> list[Sequence]:
        """Every sequence not yet finished: waiting, being admitted or running."""
        return [s for choices in self._tracked.values() for s in choices if not s.finished]

    def to_cancel(self) -> list[Sequence]:
        """Live sequences whose cancellation was asked for."""
        return [s for s in [*self.waiting, *self.running] if s.cancel_requested and not s.finished]

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill now: at most ``prefill_per_step`` requests, even
        when idle, each with all its choices (consecutive in the list) or not yet.

        Prefilling everything that waits before the first decode step would hold back
        every stream's first token until the last prompt is in; admitting a few per
        step lets early requests start streaming while later ones are prefilled.
        """
        free = self.max_batch - len(self.running)
        admitted: list[Sequence] = []
        for _ in range(self.prefill_per_step):
            group = self._head_group()
            if not group or len(admitted) + group > free:
                break  # first come, first served: a wide request is not overtaken
            admitted += [self.waiting.popleft() for _ in range(group)]
        return admitted

    def _head_group(self) -> int:
        """How many choices the first waiting request has (they queue consecutively)."""
        head = self.waiting[0].request_id if self.waiting else None
        return next((i for i, s in enumerate(self.waiting) if s.request_id != head), len(self.waiting))

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
        done = [s for choices in self._tracked.values() for s in choices if s.finished]
        for request_id in {s.request_id for s in done}:
            alive_choices = [s for s in self._tracked[request_id] if not s.finished]
            if alive_choices:
                self._tracked[request_id] = alive_choices
            else:
                del self._tracked[request_id]
        return done


def by_request(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Consecutive choices of the same request, grouped (``admit`` hands them out so)."""
    groups: list[list[Sequence]] = []
    for seq in seqs:
        if groups and groups[-1][0].request_id == seq.request_id:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups
