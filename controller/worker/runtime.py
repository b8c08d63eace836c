"""How things run: ``async with`` for start/aclose objects, until a signal, on uvloop.

``run_until_signalled`` and ``loop_factory`` serve the entry points of both
``fc-controller`` and ``fc-demo-worker``; ``AsyncLifecycle`` serves the heartbeat client
and the demo worker. Standard library only: uvloop is imported when ``loop_factory`` is
called, by an entry point, never on import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

__all__ = ["AsyncLifecycle", "loop_factory", "run_until_signalled"]


class AsyncLifecycle:
    """Gives ``async with`` to a class that defines ``async start()`` and ``async aclose()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when uvloop is installed, else ``None`` (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def run_until_signalled(
    serve: Callable[[asyncio.Event], Awaitable[int]], log: logging.Logger, stopping: str
) -> int:
    """Run ``serve(stop)``; SIGINT or SIGTERM sets ``stop``, a second one exits at once.

    ``stopping`` says what the program does on the first signal, for the log line.
    Returns what ``serve`` returns.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("Second %s: exiting at once", name)
            os._exit(128 + signum)
        log.info("Received %s: %s", name, stopping)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await serve(stop)
    finally:
        # Left installed, uvloop's handlers would swallow these signals for the rest of the
        # process (as when main() is called in-process, by tests for one).
        for signum in signals:
            loop.remove_signal_handler(signum)
