"""Work started in slices, a few pieces per turn of the event loop.

When a thousand things become ready at once (a thousand callers waiting for one round of
status probes, a thousand probes to start), asyncio runs them all in the same turn of the
loop, and nothing else runs until they are done: every other client waits that long.
A :class:`Pacer` lets ``per_turn`` of them through in one turn and the rest in the turns
after, in the order they asked, so timers, streams and other requests get turns between.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["STEP_GAP", "TURN_BUDGET", "Allowance", "Lines", "Pacer", "bulk_step"]

T = TypeVar("T")

log = logging.getLogger(__name__)


#: seconds a turn of the loop should last at most while work waits for turns: past it, an
#: :class:`Allowance` lets half as much through in the next turn
TURN_BUDGET = 0.001
#: seconds between two turns' looks past which the time between is not taken for one
#: turn's length (the loop was idle, or nothing waited in between)
_NOT_ONE_TURN = 0.05


class Allowance:
    """How many pieces of waiting work a turn of the loop lets through: ``most`` at first
    (and again after a while without work waiting), half as many after a turn that took
    longer than :data:`TURN_BUDGET` (down to one), one more after a shorter one, so that
    costly work (registrations, a status round's probes) goes fewer a turn than cheap
    work while everyone else waits out the turns. A turn's length is the time between two
    calls of :meth:`next_turn`, one a turn while work waits. ``clock`` is injectable for
    tests."""

    __slots__ = ("_clock", "_last", "most", "now")

    def __init__(self, most: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.most = self.now = max(1, most)
        self._clock = clock
        self._last: float | None = None

    def next_turn(self) -> int:
        """A turn begins: how many pieces of work it lets through."""
        now = self._clock()
        last, self._last = self._last, now
        if last is None or now - last > _NOT_ONE_TURN:
            self.now = self.most  # nothing waited for a while: start afresh
        elif now - last > TURN_BUDGET:
            self.now = max(1, self.now >> 1)
        elif self.now < self.most:
            self.now += 1
        return self.now


class Lines(dict[str, deque[T]], Generic[T]):
    """Items waiting in a line per key (a source address), served in turn: :meth:`take`
    gives the first of the line whose turn it is, and that line goes to the back, so one
    address with a long line never keeps the others waiting behind it. A dict of the
    lines, in the order of their turns (``key in lines``, ``bool(lines)``: as fast as a
    dict's)."""

    __slots__ = ()

    def add(self, key: str, item: T) -> None:
        """``item`` joins the back of ``key``'s line (a new line's turn comes last)."""
        line = self.get(key)
        if line is None:
            self[key] = line = deque()
        line.append(item)

    def take(self) -> T:
        """The first item of the first line (there must be one); its line, if any are
        left in it, goes to the back."""
        key = next(iter(self))
        line = self.pop(key)
        item = line.popleft()
        if line:
            self[key] = line
        return item

    def remove(self, key: str, item: T) -> None:
        """Take ``item`` out of ``key``'s line (``ValueError`` if it is not there), the
        line with it if it was the last."""
        line = self.get(key)
        if line is not None:
            line.remove(item)
            if not line:
                del self[key]


class Pacer:
    """At most ``per_turn`` callers of :meth:`turn` go on in one turn of the loop (a
    slice); the others wait for the next turns, first come first served. Made on the
    loop it serves. With an ``allowance``, a slice shrinks after a long turn (see
    :class:`Allowance`). ``slices`` counts the turns that had to be waited for (for tests)."""

    __slots__ = (
        "_allowance",
        "_loop",
        "_passed",
        "_scheduled",
        "_waiting",
        "limit",
        "per_turn",
        "slices",
    )

    def __init__(self, per_turn: int, allowance: Allowance | None = None) -> None:
        self.per_turn = max(1, per_turn)
        #: the slice of this turn: per_turn, or less after long turns given an allowance
        self.limit = self.per_turn
        self._allowance = allowance
        self._loop: asyncio.AbstractEventLoop | None = None
        self._passed = 0
        self._scheduled = False
        #: callers of turn waiting (their futures) and callbacks waiting (see call)
        self._waiting: deque[asyncio.Future[None] | Callable[[], object]] = deque()
        self.slices = 0

    def try_pass(self) -> bool:
        """Go on in this turn if the slice has room (``True``); else call :meth:`turn`."""
        if self._passed < self.limit and not self._waiting:
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

    def call(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` now if the slice has room, else in a later turn, in line with
        the callers of :meth:`turn` (for work done in a callback, not a task)."""
        if self.try_pass():
            callback()
            return
        self._waiting.append(callback)
        self._schedule()

    def settle(self, waiters: list[asyncio.Future[Any]], done: asyncio.Future[Any]) -> None:
        """Hand ``done``'s outcome on to ``waiters`` (a done callback of ``done``): its
        result a slice a turn, in their order, so that a thousand callers of one shared
        round do not all resume in one turn; an error or a cancellation to all at once."""
        if done.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        error = done.exception()
        for waiter in waiters:
            if error is None:
                self.call(functools.partial(_set_result, waiter, done.result()))
            elif not waiter.done():
                waiter.set_exception(error)

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
            if self._allowance is not None:
                self.limit = min(self.per_turn, self._allowance.next_turn())
        else:
            self.limit = self.per_turn  # nobody waits: the next come at once, as many
        while waiting and self._passed < self.limit:
            waiter = waiting.popleft()
            if not isinstance(waiter, asyncio.Future):
                self._passed += 1
                try:
                    waiter()
                except Exception:  # one failing callback must not strand the rest
                    log.exception("A paced callback failed")
            elif not waiter.done():  # a waiter cancelled meanwhile takes no place
                waiter.set_result(None)
                self._passed += 1
        if waiting or self._passed:
            self._schedule()


def _set_result(waiter: asyncio.Future[Any], value: object) -> None:
    if not waiter.done():  # its caller left meanwhile
        waiter.set_result(value)


#: seconds from the end of one step of large work to the start of the next, at least
STEP_GAP = 0.001

#: per event loop, the lane the steps of large work share
_LANES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = weakref.WeakKeyDictionary()


class _Lane:
    """Steps of large work, one at a time, each starting :data:`STEP_GAP` after the one
    before it ended, first come first served."""

    __slots__ = ("_clock", "_loop", "_next", "_timer", "_waiting")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._loop = loop
        #: not the loop's clock: uvloop's ticks in milliseconds
        self._clock = clock
        self._next = 0.0  # when the next step may start
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def step(self) -> None:
        now = self._clock()
        if not self._waiting and now >= self._next:
            self._next = now + STEP_GAP  # replaced by the end of the step, at its next call
            return
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        self._arm(now)
        await waiter

    def ended(self) -> None:
        """A step just ended: the next starts no sooner than STEP_GAP from now."""
        self._next = self._clock() + STEP_GAP

    def _arm(self, now: float) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(max(0.0, self._next - now), self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._clock()
        if now < self._next:  # a step ended since the timer was set
            self._arm(now)
            return
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():  # one cancelled meanwhile takes no place
                waiter.set_result(None)
                self._next = self._clock() + STEP_GAP  # until it says it ended
                break
        if waiting:
            self._arm(self._clock())


async def bulk_step() -> None:
    """A pause between two steps of large work (a large body checked or joined): the loop
    runs what else is ready, and steps of all such work take turns in one lane, one at a
    time, with at least :data:`STEP_GAP` between the end of one and the start of the next.
    Five large bodies read at once then cost other clients one step at a time, not five,
    and a request that needs two or three turns of the loop usually finds no step in its
    way: large work gets at most about half the loop while other work is waiting."""
    loop = asyncio.get_running_loop()
    lane = _LANES.get(loop)
    if lane is None:
        lane = _LANES[loop] = _Lane(loop)
    lane.ended()
    await asyncio.sleep(0)
    await lane.step()
