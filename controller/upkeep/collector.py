"""Full garbage collections at calm moments rather than in the middle of a burst.

Python starts a full collection on its own after ten collections of the middle generation
(if enough objects have survived since the last one), whatever the process is doing. In a
burst (a thousand requests arriving together) those come quickly, and a full collection
then walks every object of every request in flight: one took 31 ms of a 48 ms stall in the
hostile benchmark's status fan-out (docs/performance.md). The young generations are
collected by Python as before; the standalone controller takes over the timing of the
full ones (:meth:`FullCollections.start`):

- the middle generation is collected every ``MIDDLE_EVERY`` young collections instead of
  every 10, so that each walks less;
- a full one is *due* once Python would have considered it (``FULL_AFTER`` middle
  collections since the last: as many young ones as Python's own 10 times 10), the oldest
  generation has grown by a quarter since the last (Python's own rule: a heap of long-lived
  objects, such as the 65,536 changes the registry's feed keeps, is not walked again and
  again for the little that changed: 40 ms each time in the hostile benchmark), and the
  last one's length times ``1 / MAX_SHARE`` has passed since it ended (full collections
  never take more than ``MAX_SHARE`` of the time);
- a due collection runs at the next check (every ``CHECK_EVERY`` seconds) that finds the
  process calm (at most ``CALM`` middle collections since the check before: little is
  being allocated), or when it has waited ``LONGEST_WAIT`` seconds, busy or not, so that
  garbage in cycles is still freed under sustained load.

Embedded in another program, the controller leaves the collector alone: the host owns it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = [
    "CALM",
    "CHECK_EVERY",
    "FULL_AFTER",
    "LONGEST_WAIT",
    "MAX_SHARE",
    "MIDDLE_EVERY",
    "NEVER",
    "FullCollections",
]

log = logging.getLogger(__name__)

#: young collections between two of the middle generation (Python's default is 10): a
#: middle collection walks what survived that many young ones, which in a burst (a
#: thousand requests in flight) took 2-5 ms at 10, under 3 ms at 2
MIDDLE_EVERY = 2
#: middle-generation collections after which a full one is due: as many young ones as
#: Python's defaults (10 middle collections of 10 young ones each)
FULL_AFTER = 50
#: seconds between two looks at whether a full collection is due and the moment calm
CHECK_EVERY = 1.0
#: middle-generation collections since the previous look at most, for the moment to be
#: calm (about 3,500 objects allocated and kept a while, at Python's young threshold)
CALM = 5
#: seconds a due full collection waits for calm at most
LONGEST_WAIT = 30.0
#: the largest share of the time full collections may take
MAX_SHARE = 0.01
#: the oldest generation's threshold that keeps Python from starting a full collection
NEVER = 2**31 - 1


class Collector(Protocol):
    """What is used of the :mod:`gc` module (tests give a fake one)."""

    def get_threshold(self) -> tuple[int, int, int]: ...
    def set_threshold(
        self, threshold0: int, threshold1: int = ..., threshold2: int = ...
    ) -> None: ...

    def get_count(self) -> tuple[int, int, int]: ...
    def get_objects(self, generation: int | None = ...) -> list[Any]: ...
    def get_stats(self) -> list[dict[str, Any]]: ...
    def collect(self, generation: int = ...) -> int: ...


class FullCollections:
    """Runs the full collections itself from :meth:`start` to :meth:`stop` (see the
    module's text). ``clock``, ``sleep`` and ``collector`` are injectable for tests;
    ``collections`` counts the full collections it ran, ``forced`` those of them that
    did not wait for calm."""

    def __init__(
        self,
        *,
        collector: Collector = gc,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._gc = collector
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._saved: tuple[int, int, int] | None = None
        #: when the last full collection ended and how long it took
        self._last_end = clock()
        self._last_length = 0.0
        #: middle-generation collections counted at the previous look
        self._middle_seen = 0
        #: middle-generation collections counted when the count towards FULL_AFTER began
        #: (at the last full collection, or when the oldest generation had not grown enough)
        self._counted_from = 0
        #: objects in the oldest generation after the last full collection
        self._long_lived = 0
        self._baseline()
        #: when the collection due now became due (None: none is)
        self._due_since: float | None = None
        self.collections = 0
        self.forced = 0

    def start(self) -> None:
        """Take over the full collections (Python no longer starts them) and begin
        checking, on the running loop."""
        if self._task is not None:
            return
        self._saved = self._gc.get_threshold()
        young = self._saved[0]
        self._gc.set_threshold(young, MIDDLE_EVERY, NEVER)
        # Measured again now: the standalone controller starts this once its start-up
        # objects are frozen out of the oldest generation (cli.settle_heap), which measured
        # before would put the first collection off until the heap grew past their count.
        self._baseline()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="fc-controller full collections"
        )

    async def stop(self) -> None:
        """Stop checking and give the full collections back to Python."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._saved is not None:
            self._gc.set_threshold(*self._saved)
            self._saved = None

    async def _run(self) -> None:
        while True:
            await self._sleep(CHECK_EVERY)
            self.check()

    def check(self) -> bool:
        """One look: run a full collection if one is due and the moment is right;
        ``True`` if it ran one."""
        middle = self._middle_collections()
        busy = middle - self._middle_seen > CALM
        self._middle_seen = middle
        now = self._clock()
        spaced = now - self._last_end >= self._last_length / MAX_SHARE
        if middle - self._counted_from < FULL_AFTER or not spaced:
            self._due_since = None
            return False
        if self._due_since is None:
            # Python's rule: objects new to the oldest generation since the last full
            # collection must be more than a quarter of those it kept then.
            if len(self._gc.get_objects(2)) - self._long_lived <= self._long_lived // 4:
                self._counted_from = middle  # look again FULL_AFTER collections on
                return False
            self._due_since = now
        waited = now - self._due_since
        if busy and waited < LONGEST_WAIT:
            return False
        self._collect(forced=busy)
        return True

    def _collect(self, *, forced: bool) -> None:
        began = self._clock()
        found = self._gc.collect(2)
        self._last_end = self._clock()
        self._last_length = self._last_end - began
        self._middle_seen = self._counted_from = self._middle_collections()
        self._long_lived = len(self._gc.get_objects(2))
        self._due_since = None
        self.collections += 1
        self.forced += forced
        log.debug(
            "Full garbage collection%s: %d unreachable objects, %.1f ms",
            " (waited long enough for calm)" if forced else "",
            found,
            self._last_length * 1000,
        )

    def _baseline(self) -> None:
        """Where the counts towards the next full collection start: Python's own count of
        middle collections since its last full one, and the oldest generation as it is."""
        self._middle_seen = self._middle_collections()
        self._counted_from = self._middle_seen - self._gc.get_count()[2]
        self._long_lived = len(self._gc.get_objects(2))

    def _middle_collections(self) -> int:
        collections: int = self._gc.get_stats()[1]["collections"]
        return collections
