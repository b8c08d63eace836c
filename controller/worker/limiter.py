"""``ConcurrencyLimiter``: at most N requests at once, and the queue length a worker reports.

Its ``queue_length`` is what FastChat's controller expects in a heartbeat; pass the limiter
as a heartbeat client's ``queue_length``.
"""

from __future__ import annotations

import asyncio

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter:
    """Lets at most ``limit`` requests run at once and counts the queue a worker reports.

    Use ``async with limiter:`` around the work of one request (for a streamed response,
    around the whole stream). Waiters get a slot in arrival order. ``queue_length`` is
    running plus waiting, what FastChat's controller expects in a heartbeat; pass the
    limiter itself as a ``HeartbeatClient``'s ``queue_length``.

    ``queue_length`` is a single integer, so another thread (such as a
    ``SyncHeartbeatClient``) may read it; everything else belongs to the event loop.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        self._limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._running = 0
        # Running plus waiting kept in one int so that a reader never sees a half update.
        self._queued = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._queued - self._running

    @property
    def queue_length(self) -> int:
        """Running plus waiting requests."""
        return self._queued

    def locked(self) -> bool:
        """Whether a new request would have to wait."""
        return self._running + self.waiting >= self._limit

    async def acquire(self) -> None:
        """Wait for a slot. Prefer ``async with``."""
        self._queued += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._queued -= 1
            raise
        self._running += 1

    def release(self) -> None:
        """Give a slot back."""
        if self._running == 0:
            raise RuntimeError("release() called without a matching acquire()")
        self._running -= 1
        self._queued -= 1
        self._semaphore.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyLimiter limit={self._limit} running={self._running} "
            f"waiting={self.waiting}>"
        )
