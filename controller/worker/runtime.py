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
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, Self, TypeVar

from .logs import RedactUrls, configure_logging

__all__ = [
    "AsyncLifecycle",
    "RedactUrls",
    "loop_factory",
    "raise_descriptor_limit",
    "run_main",
    "run_until_signalled",
    "serve_until_signalled",
]


class AsyncLifecycle:
    """Gives ``async with`` to a class that defines ``async start()`` and ``async aclose()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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


class _Service(Protocol):
    async def aclose(self) -> None: ...


S = TypeVar("S", bound=_Service)


async def serve_until_signalled(
    start: Callable[[], Awaitable[S]],
    announce: Callable[[S], None],
    where: str,
    log: logging.Logger,
    stopping: str,
) -> int:
    """Start a server, ``announce`` it, serve until SIGINT or SIGTERM, then close it.

    Returns the exit status: 1 if it cannot listen (``where`` names the address in the
    error), else 0.
    """

    async def serve(stop: asyncio.Event) -> int:
        try:
            service = await start()
        except OSError as e:
            log.error("Cannot listen on %s: %s", where, e)
            return 1
        try:
            announce(service)
            await stop.wait()
        finally:
            await service.aclose()
        log.info("Stopped")
        return 0

    return await run_until_signalled(serve, log, stopping)


#: the soft descriptor limit aimed at when the hard limit is unlimited
_DESCRIPTORS_WANTED = 1 << 20


def raise_descriptor_limit(log: logging.Logger) -> int:
    """Raise this process's soft limit on open descriptors to its hard limit; return it.

    Every client and worker connection is a descriptor: at a default soft limit of 1,024,
    a thousand idle sockets would lock everyone else out. Logged, so an operator sees the
    limit the server runs with.
    """
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _DESCRIPTORS_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warning("Cannot raise the descriptor limit from %d to %d: %s", soft, wanted, e)
            return int(soft)
        log.info("Descriptor limit raised from %d to %d", soft, wanted)
        return int(wanted)
    log.info("Descriptor limit %d", soft)
    return int(soft)


def run_main(
    main: Coroutine[Any, Any, int],
    level: str,
    log_format: str = "text",
    log_filters: Iterable[logging.Filter] = (),
) -> int:
    """Configure logging to stderr at ``level`` in ``log_format`` (see
    :func:`~controller.worker.logs.configure_logging`), raise the descriptor limit, and run
    ``main`` on uvloop (when installed) until it returns the process exit status. For
    entry points only."""
    configure_logging(level, log_format, log_filters)
    raise_descriptor_limit(logging.getLogger(__name__))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
