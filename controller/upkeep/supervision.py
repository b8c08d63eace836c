"""Keeping the background tasks running: one that raises is logged and started again.

The controller's background work (the expiry sweep, load polls, the disconnect watch, the
state file's saver, the parent link) runs as tasks nobody awaits until shutdown, so an
exception would end one silently and leave, say, a controller that never expires a
worker. :func:`supervise` runs such work, logs a failure at ERROR with its traceback and
starts it again after a delay that doubles with each failure in a row. Cancellation is
never caught: it is how the controller stops them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["FIRST_DELAY", "HEALTHY_AFTER", "MAX_DELAY", "supervise"]

log = logging.getLogger(__name__)

#: the wait before the first restart; it doubles with each failure in a row
FIRST_DELAY = 0.1
#: the longest wait between two restarts
MAX_DELAY = 30.0
#: a run this long (seconds) before it failed counts as healthy: the delay starts over
HEALTHY_AFTER = 60.0


async def supervise(
    work: Callable[[], Awaitable[None]],
    name: str,
    *,
    first_delay: float = FIRST_DELAY,
    max_delay: float = MAX_DELAY,
    healthy_after: float = HEALTHY_AFTER,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run ``work()`` until it returns or the task is cancelled, restarting it when it raises.

    ``work`` makes a fresh coroutine for each run. The delay before a restart starts at
    ``first_delay``, doubles up to ``max_delay`` while failures follow each other, and
    starts over after a run that lasted ``healthy_after`` seconds.
    """
    delay = first_delay
    while True:
        started = clock()
        try:
            await work()
            return
        except Exception:
            if clock() - started >= healthy_after:
                delay = first_delay
            log.exception("Background task %s failed; restarting it in %g s", name, delay)
        await sleep(delay)
        delay = min(delay * 2, max_delay)
