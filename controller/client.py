"""Worker-side helpers: register with a controller, keep heartbeating, say goodbye.

A model worker uses these to join a FastChat controller (this project's or the original)::

    limiter = ConcurrencyLimiter(5)
    config = HeartbeatConfig.from_environ(
        controller_address="http://localhost:21001",
        worker_address="http://10.0.0.5:21002",
        model_names=["vicuna-7b"],
    )
    HeartbeatClient(config, limiter).attach(app)  # app: the worker's aiohttp application

The client registers the worker, then sends a heartbeat every ``interval`` seconds with the
queue length the worker reports. It never raises into the worker: a controller that is
down, slow or answering errors is retried with capped, jittered backoff, forever, and a
controller that answers ``exist: false`` (it restarted) gets a fresh registration at once.
On close it tells the controller that the worker is leaving.

``SyncHeartbeatClient`` does the same from a daemon thread for workers that are not asyncio
programs. Nothing here imports the server side of this package.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeAlias

import aiohttp

from ._client_core import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_HEART_BEAT_INTERVAL,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_UNREGISTER_TIMEOUT,
    ENV_HEART_BEAT_INTERVAL,
    JSON_HEADERS,
    Backoff,
    BadAnswer,
    Core,
    HeartbeatConfig,
    HeartbeatStats,
    SupportsQueueLength,
    check_register_answer,
    describe,
    heart_beat_interval_from_environ,
    log,
    log_unregister_failed,
    log_unregistered,
    parse_heartbeat_answer,
    parse_unregister_answer,
)
from ._client_sync import SyncHeartbeatClient

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_HEART_BEAT_INTERVAL",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_UNREGISTER_TIMEOUT",
    "ENV_HEART_BEAT_INTERVAL",
    "Backoff",
    "ConcurrencyLimiter",
    "HeartbeatClient",
    "HeartbeatConfig",
    "HeartbeatStats",
    "QueueLengthSource",
    "SupportsQueueLength",
    "SyncHeartbeatClient",
    "heart_beat_interval_from_environ",
]

#: Where the queue length comes from: a callable (sync or async) or an object with a
#: ``queue_length`` attribute such as ``ConcurrencyLimiter``.
QueueLengthSource: TypeAlias = Callable[[], int | Awaitable[int]] | SupportsQueueLength

# Errors a call to an unreachable, slow or confused controller is expected to raise.
_CALL_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, BadAnswer)


def _queue_length_function(
    source: QueueLengthSource | None,
) -> Callable[[], int | Awaitable[int]]:
    if source is None:
        return lambda: 0
    if callable(source):
        return source
    if hasattr(source, "queue_length"):
        return lambda: source.queue_length
    raise TypeError(
        f"queue_length must be a callable or have a queue_length attribute, got {source!r}"
    )


class HeartbeatClient:
    """Registers a worker with a controller and keeps it registered, from asyncio.

    ``queue_length`` reports the worker's current load (running plus waiting requests): a
    plain or async callable, or an object with a ``queue_length`` attribute such as a
    ``ConcurrencyLimiter``; by default the worker reports 0. ``session`` lets the client
    share the worker's ``aiohttp.ClientSession`` (which it then does not close); ``rng``
    drives the backoff jitter.

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
    ) -> None:
        self.config = config
        self._queue_length = _queue_length_function(queue_length)
        self._core = Core(config, rng if rng is not None else random.Random())
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
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        while True:
            started = loop.time()
            try:
                await self._exchange()
            except _CALL_ERRORS as e:
                delay = self._core.on_failure(describe(e, self.config.request_timeout), loop.time())
                self._notify()
                await asyncio.sleep(delay)
                continue
            except Exception as e:
                # A bug here must not stop the heartbeats: log it loudly and carry on.
                delay = self._core.on_failure(describe(e, 0), loop.time(), error=e)
                self._notify()
                await asyncio.sleep(delay)
                continue
            # The interval runs from the start of this beat, however long the call took.
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def _exchange(self) -> None:
        """One heartbeat, or a registration when the controller does not know the worker."""
        core = self._core
        loop = asyncio.get_running_loop()
        queue_length = await self._read_queue_length()
        if core.registered:
            status, body = await self._post(*core.heartbeat_request(queue_length))
            core.on_heartbeat(parse_heartbeat_answer(status, body), loop.time())
            self._notify()
            if core.registered:
                return
        status, body = await self._post(*core.register_request(queue_length))
        check_register_answer(status, body)
        core.on_registered(loop.time())
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
            url, data=body, headers=JSON_HEADERS, timeout=client_timeout or self._timeout
        ) as response:
            return response.status, await response.read()

    async def _unregister(self) -> None:
        timeout = self.config.unregister_timeout
        try:
            status, body = await self._post(
                *self._core.unregister_request(), aiohttp.ClientTimeout(total=timeout)
            )
            removed = parse_unregister_answer(status, body)
        except Exception as e:
            log_unregister_failed(self.config, describe(e, timeout))
            return
        log_unregistered(self.config, removed)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait raises only if this task is cancelled (again) while waiting; checking
    # current_task().cancelling() would also trip when aclose() runs as cleanup of a task
    # that was cancelled earlier, and skip the goodbye that cleanup is for.
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("The heartbeat task had failed", exc_info=task.exception())


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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyLimiter limit={self._limit} running={self._running} "
            f"waiting={self.waiting}>"
        )
