"""The bytes all relays may hold at once (``--max-buffered-bytes``), shared by every relay.

A stream holds the messages it has not handed to the client yet and the start of a message
still arriving; a single-document call holds its answer. A stream over the budget stops
reading from its worker until the budget frees (back-pressure); a single-document call
that cannot reserve its answer fails at once. So no relay ever waits for another one's
bytes, except in one case handled here: when every byte held belongs to streams that are
waiting, the one holding most is let go on, since only finishing its message frees any.
The budget may thus be passed by at most one stream's message (16 MiB) and one read.

The relays also share their bulk reads: a connection that has just read 64 KiB or more
from its worker reads again in a later turn of the loop, and only one such connection a
turn does (:attr:`Budget.bulk_reads`), however many workers are pouring answers at once.
"""

from __future__ import annotations

from collections.abc import Callable

from ..pacing import Pacer

__all__ = ["Budget"]


class Budget:
    """A count of bytes held across relays, and the streams waiting for it to free."""

    __slots__ = ("_held_by_parked", "_parked", "bulk_reads", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: connections reading in bulk read again one a turn, in the order they read: four
        #: answers of 256 MiB at once were four reads of 256 KiB in every turn (1-2 ms)
        self.bulk_reads = Pacer(1)
        #: waiting streams: their resume callback and how many bytes each holds
        self._parked: dict[Callable[[], object], int] = {}
        self._held_by_parked = 0

    @property
    def over(self) -> bool:
        return self.used > self.limit

    @property
    def parked(self) -> int:
        return len(self._parked)

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit; ``False`` (nothing taken) if they do not."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def take(self, size: int) -> None:
        """Count ``size`` bytes a stream holds, whether or not they fit."""
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
        if self._parked:
            self._unpark()

    def park(self, resume: Callable[[], object], held: int) -> bool:
        """Wait for the budget to free; ``False`` if the caller must go on (see above)."""
        if self.used - held <= self._held_by_parked:
            return False  # nobody else can free anything
        self._parked[resume] = held
        self._held_by_parked += held
        return True

    def leave(self, resume: Callable[[], object]) -> None:
        """A parked stream ended: it waits no more."""
        held = self._parked.pop(resume, None)
        if held is not None:
            self._held_by_parked -= held

    def _unpark(self) -> None:
        while self._parked and (self.used <= self.limit or self.used <= self._held_by_parked):
            resume = next(iter(self._parked))
            self._held_by_parked -= self._parked.pop(resume)
            resume()
