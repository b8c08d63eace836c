"""Work started in slices, a few pieces per turn of the event loop.

When a thousand things become ready at once (a thousand callers waiting for one round of
status probes, a thousand probes to start), asyncio runs them all in the same turn of the
loop, and nothing else runs until they are done: every other client waits that long.
A :class:`Pacer` lets ``per_turn`` of them through in one turn and the rest in the turns
after, in the order they asked, so timers, streams and other requests get turns between.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Pacer"]


class Pacer:
    """At most ``per_turn`` callers of :meth:`turn` go on in one turn of the loop (a
    slice); the others wait for the next turns, first come first served. Made on the
    loop it serves. ``slices`` counts the turns that had to be waited for (for tests)."""

    __slots__ = ("_loop", "_passed", "_scheduled", "_waiting", "per_turn", "slices")

    def __init__(self, per_turn: int) -> None:
        self.per_turn = max(1, per_turn)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._passed = 0
        self._scheduled = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.slices = 0

    @property
    def free(self) -> bool:
        """Whether a caller may go on in this turn without waiting."""
        return self._passed < self.per_turn and not self._waiting

    def try_pass(self) -> bool:
        """Go on in this turn if the slice has room (``True``); else call :meth:`turn`."""
        if self._passed < self.per_turn and not self._waiting:
            self._passed += 1
            if not self._scheduled:
                self._schedule()
            return True
        return False

    async def turn(self) -> None:
        """Return in this turn if the slice has room, else in a later one."""
        if self.try_pass():
            return
        loop = self._loop = self._loop or asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        self._schedule()
        await waiter

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._passed = 0
        waiting = self._waiting
        if waiting:
            self.slices += 1
        while waiting and self._passed < self.per_turn:
            waiter = waiting.popleft()
            if not waiter.done():  # a waiter cancelled meanwhile takes no place
                waiter.set_result(None)
                self._passed += 1
        if waiting or self._passed:
            self._schedule()
