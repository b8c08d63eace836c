"""Measuring how late the event loop runs what is due: a cheap periodic sampler.

The sampler asks to be woken ``interval`` seconds later, records how much later than that
it actually ran, and asks again. Anything that holds the loop (a long computation, a
blocking call, a burst of work) delays the wake-up due meanwhile by as long as it held the
loop past the due time: a stall of S seconds shows as a lag between S - ``interval`` and S.
One wake-up per interval costs microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["LAG_INTERVAL", "sample_loop_lag"]

#: seconds between two samples (and the most a stall's sample may fall short of it)
LAG_INTERVAL = 0.25


async def sample_loop_lag(
    observe: Callable[[float], None],
    interval: float = LAG_INTERVAL,
    *,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Forever: sleep ``interval`` seconds and ``observe`` how late the wake-up was.

    ``clock`` defaults to the running loop's (the one its timers run on); tests inject
    both the clock and ``sleep`` to drive it by hand.
    """
    if clock is None:
        clock = asyncio.get_running_loop().time
    while True:
        due = clock() + interval
        await sleep(interval)
        observe(max(clock() - due, 0.0))
