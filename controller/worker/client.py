"""The asyncio heartbeat client, ``HeartbeatClient``: register, heartbeat, say goodbye.

It registers the worker, then sends a heartbeat every ``interval`` seconds with the queue
length the worker reports. It never raises into the worker: a controller that is down,
slow or answering errors is retried with capped, jittered backoff, forever, and a
controller that answers ``exist: false`` (it restarted) gets a fresh registration at once.
On close it tells the controller that the worker is leaving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Literal, Self, TypeAlias

import aiohttp

from .config import HeartbeatConfig
from .core import ClientBase, HeartbeatStats, SupportsQueueLength, queue_length_function
from .runtime import AsyncLifecycle
from .wire import BadAnswer, headers

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["HeartbeatClient", "QueueLengthSource"]

log = logging.getLogger(__name__)

#: Where the queue length comes from: a callable (sync or async) or an object with a
#: ``queue_length`` attribute such as ``ConcurrencyLimiter``.
QueueLengthSource: TypeAlias = Callable[[], int | Awaitable[int]] | SupportsQueueLength

# Errors a call to an unreachable, slow or confused controller is expected to raise.
_CALL_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, BadAnswer)


class HeartbeatClient(AsyncLifecycle, ClientBase[int | Awaitable[int]]):
    """Registers a worker with a controller and keeps it registered, from asyncio.

    ``queue_length`` reports the worker's current load (running plus waiting requests): a
    plain or async callable, or an object with a ``queue_length`` attribute such as a
    ``ConcurrencyLimiter``; by default the worker reports 0. ``session`` lets the client
    share the worker's ``aiohttp.ClientSession`` (which it then does not close); ``rng``
    drives the backoff jitter. ``clock`` (monotonic seconds) and ``sleep`` schedule the
    heartbeats and retries; tests pass a fake pair to drive time themselves. Call
    timeouts stay on real time.

    Run it with ``async with``, with ``await start()`` and ``await aclose()``, or tie it to
    the worker's aiohttp application with ``attach(app)``.
    """

    def __init__(
        self,
        config: HeartbeatConfig,
        queue_length: QueueLengthSource | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(config, queue_length_function(queue_length), rng, clock)
        self._sleep = sleep
        self._session = session
        self._owns_session = session is None
        self._state: Literal["new", "running", "closed"] = "new"
        self._task: asyncio.Task[None] | None = None
        self._timeout = aiohttp.ClientTimeout(total=config.request_timeout)
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start registering and heartbeating in a background task; returns at once.

        It does not wait for the controller: a worker may start before its controller.
        Use ``wait_registered()`` to wait for the first registration.
        """
        if self._state != "new":
            raise RuntimeError(
                "this HeartbeatClient was already started; make a new one to start again"
            )
        if self._session is None:
            # trust_env=False: the controller is an internal address; a proxy set for the
            # outside world must not capture it.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        self._state = "running"
        self._task = asyncio.create_task(
            self._run(), name=f"fc-heartbeat {self.config.worker_address}"
        )

    async def aclose(self) -> None:
        """Stop heartbeating and tell the controller the worker is leaving.

        The goodbye (``POST /unregister_worker``) is bounded by ``unregister_timeout``; if it
        fails the controller expires the worker as usual. Never raises, except
        ``CancelledError`` when the caller is cancelled. Idempotent.
        """
        if self._state == "closed":
            return
        was_running = self._state == "running"
        self._state = "closed"
        self._core.closed = True
        task, self._task = self._task, None
        try:
            if task is not None:
                await _cancel_and_wait(task)
            if was_running and self.config.unregister_on_close and self._core.register_attempted:
                await self._unregister()
        finally:
            session = self._session
            if self._owns_session and session is not None:
                self._session = None
                await session.close()
            self._notify()

    def attach(self, app: web.Application) -> Self:
        """Start with ``app`` and leave with it; call before the application starts.

        The client starts when the application starts up and says goodbye in
        ``on_shutdown``, which runs before in-flight requests are awaited, so the
        controller stops sending new work while the last requests finish.
        """
        app.cleanup_ctx.append(self._app_context)
        app.on_shutdown.append(self._on_shutdown)
        return self

    async def _app_context(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.aclose()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.aclose()

    # -- state -----------------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """The controller accepted our registration and has not said it forgot us since."""
        return self._core.registered

    def statistics(self) -> HeartbeatStats:
        """A snapshot of the client's state and counters."""
        return self._core.statistics()

    async def wait_until(self, predicate: Callable[[HeartbeatStats], bool]) -> HeartbeatStats:
        """Wait until ``predicate(statistics())`` holds; returns that snapshot.

        Raises ``RuntimeError`` if the client closes first. Bound it with
        ``asyncio.timeout`` or ``asyncio.wait_for``.
        """
        while True:
            stats = self._core.statistics()
            if predicate(stats):
                return stats
            if stats.closed:
                raise RuntimeError("the HeartbeatClient closed before the condition held")
            await self._changed.wait()

    async def wait_registered(self) -> HeartbeatStats:
        """Wait until the worker is registered (returns at once if it is)."""
        return await self.wait_until(lambda s: s.registered)

    def _notify(self) -> None:
        # Wake every waiter, then give later waiters a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            started = self._clock()
            error: Exception | None = None
            try:
                await self._exchange()
            except Exception as e:
                error = e
            delay = self._core.after_exchange(
                started, self._clock(), error, isinstance(error, _CALL_ERRORS)
            )
            if error is not None:
                self._notify()
            await self._sleep(delay)

    async def _exchange(self) -> None:
        """One heartbeat, or a registration when the controller does not know the worker."""
        core = self._core
        queue_length = await self._read_queue_length()
        if core.registered:
            status, body = await self._post(*core.heartbeat_request(queue_length))
            exist = core.on_heartbeat_answer(status, body, self._clock())
            self._notify()
            if exist:
                return
        status, body = await self._post(*core.register_request(queue_length))
        core.on_register_answer(status, body, self._clock())
        self._notify()

    async def _read_queue_length(self) -> int:
        try:
            value = self._queue_length()
            if inspect.isawaitable(value):
                value = await value
            return self._core.queue_length_ok(value)
        except Exception as e:
            return self._core.queue_length_failed(e)

    async def _post(
        self, url: str, body: bytes, client_timeout: aiohttp.ClientTimeout | None = None
    ) -> tuple[int, bytes]:
        session = self._session
        assert session is not None, "start() opens the session"
        async with session.post(
            url, data=body, headers=headers(self.config), timeout=client_timeout or self._timeout
        ) as response:
            return response.status, await response.read()

    async def _unregister(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.unregister_timeout)
        try:
            status, body = await self._post(*self._core.unregister_request(), timeout)
        except Exception as e:
            self._core.on_unregister_failed(e)
            return
        self._core.on_unregister_answer(status, body)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait raises only if this task is cancelled (again) while waiting; checking
    # current_task().cancelling() would also trip when aclose() runs as cleanup of a task
    # that was cancelled earlier, and skip the goodbye that cleanup is for.
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("The heartbeat task had failed", exc_info=task.exception())
