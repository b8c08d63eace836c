"""The thread heartbeat client, ``SyncHeartbeatClient``, for workers that are not asyncio programs.

It runs in one daemon thread and uses only the standard library (``urllib``) for HTTP, so
a threaded worker needs nothing beyond what this package already requires.
"""

from __future__ import annotations

import http.client
import inspect
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self, TypeAlias

from .config import HeartbeatConfig
from .core import ClientBase, HeartbeatStats, SupportsQueueLength, queue_length_function
from .wire import BadAnswer, headers

__all__ = ["SyncHeartbeatClient", "SyncQueueLengthSource", "Waiter"]

log = logging.getLogger(__name__)

#: A plain callable, or an object with a ``queue_length`` attribute. It is called from the
#: heartbeat thread, so it must be safe to call from there.
SyncQueueLengthSource: TypeAlias = Callable[[], int] | SupportsQueueLength

#: Waits on a condition (held by the caller) until the predicate holds or the timeout, in
#: seconds of the client's clock, runs out; returns the predicate. The shape of
#: ``threading.Condition.wait_for``, which is the default.
Waiter: TypeAlias = Callable[[threading.Condition, Callable[[], bool], float], bool]

_CALL_ERRORS = (OSError, http.client.HTTPException, BadAnswer)


def _wait_for(
    condition: threading.Condition, predicate: Callable[[], bool], timeout: float
) -> bool:
    return condition.wait_for(predicate, timeout)


def _sync_queue_length_function(source: SyncQueueLengthSource | None) -> Callable[[], int]:
    if inspect.iscoroutinefunction(source):
        raise TypeError(
            "SyncHeartbeatClient calls queue_length from a thread and cannot await it; "
            "pass a plain function, or use HeartbeatClient in an asyncio program"
        )
    return queue_length_function(source)


class SyncHeartbeatClient(ClientBase[int]):
    """Registers a worker with a controller and keeps it registered, from a daemon thread.

    Behaves like ``HeartbeatClient`` (same ``HeartbeatConfig``, backoff, re-registration
    and goodbye) for programs without an event loop, such as FastChat's threaded workers.
    ``queue_length`` is called from the heartbeat thread. ``clock`` (monotonic seconds)
    and ``wait`` (see ``Waiter``) schedule the heartbeats and retries; tests pass a fake
    pair to drive time themselves. Call timeouts stay on real time.

    Use it as a context manager, or call ``start()`` and later ``close()``.
    """

    def __init__(
        self,
        config: HeartbeatConfig,
        queue_length: SyncQueueLengthSource | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Waiter = _wait_for,
    ) -> None:
        super().__init__(config, _sync_queue_length_function(queue_length), rng, clock)
        self._wait = wait
        # Guards the core (mutated by the thread, read by callers), wakes waiters, and
        # wakes the thread from its wait between beats when the client closes.
        self._changed = threading.Condition()
        self._state: Literal["new", "running", "closed"] = "new"
        self._stopping = False
        self._thread: threading.Thread | None = None
        # No proxies: the controller is an internal address (aiohttp's default too).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start registering and heartbeating in a daemon thread; returns at once."""
        if self._state != "new":
            raise RuntimeError(
                "this SyncHeartbeatClient was already started; make a new one to start again"
            )
        self._state = "running"
        self._thread = threading.Thread(
            target=self._run, name=f"fc-heartbeat {self.config.worker_address}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and tell the controller the worker is leaving. Never raises.

        Waits for a call in flight to end (at most about ``request_timeout``), then sends
        the goodbye, bounded by ``unregister_timeout``. Idempotent.
        """
        if self._state == "closed":
            return
        was_running = self._state == "running"
        self._state = "closed"
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            # urllib cannot be interrupted; its own timeout bounds the wait.
            thread.join(timeout=2 * self.config.request_timeout + 1)
            if thread.is_alive():
                log.warning("The heartbeat thread did not stop in time; leaving it behind")
        try:
            if was_running and self.config.unregister_on_close and self._core.register_attempted:
                self._unregister()
        finally:
            with self._changed:
                self._core.closed = True
                self._changed.notify_all()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """The controller accepted our registration and has not said it forgot us since."""
        return self._core.registered

    def statistics(self) -> HeartbeatStats:
        """A snapshot of the client's state and counters."""
        with self._changed:
            return self._core.statistics()

    def wait_until(
        self, predicate: Callable[[HeartbeatStats], bool], timeout: float | None = None
    ) -> HeartbeatStats | None:
        """Wait until ``predicate(statistics())`` holds; that snapshot, or ``None`` on timeout.

        Also returns ``None`` if the client closes before the condition holds.
        """
        # The caller's timeout is real time, whatever clock schedules the heartbeats.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                stats = self._core.statistics()
                if predicate(stats):
                    return stats
                if stats.closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def wait_registered(self, timeout: float | None = None) -> bool:
        """Wait until the worker is registered; ``False`` on timeout."""
        return self.wait_until(lambda s: s.registered, timeout) is not None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            started = self._clock()
            error: Exception | None = None
            try:
                self._exchange()
            except Exception as e:
                error = e
            with self._changed:
                delay = self._core.after_exchange(
                    started, self._clock(), error, isinstance(error, _CALL_ERRORS)
                )
                if error is not None:
                    self._changed.notify_all()
                # Not a sleep: close() wakes this wait at once.
                if self._wait(self._changed, lambda: self._stopping, delay):
                    return

    def _exchange(self) -> None:
        core = self._core
        queue_length = self._read_queue_length()
        timeout = self.config.request_timeout
        if core.registered:
            with self._changed:
                url, body = core.heartbeat_request(queue_length)
            status, answer = self._post(url, body, timeout)
            with self._changed:
                exist = core.on_heartbeat_answer(status, answer, self._clock())
                self._changed.notify_all()
            if exist:
                return
        if self._stopping:
            return
        with self._changed:
            url, body = core.register_request(queue_length)
        status, answer = self._post(url, body, timeout)
        with self._changed:
            core.on_register_answer(status, answer, self._clock())
            self._changed.notify_all()

    def _read_queue_length(self) -> int:
        try:
            value: object = self._queue_length()
            if inspect.isawaitable(value):
                close = getattr(value, "close", None)
                if close is not None:
                    close()  # a never-awaited coroutine would warn
                raise TypeError("queue_length returned an awaitable; the thread cannot await it")
            with self._changed:
                return self._core.queue_length_ok(value)
        except Exception as e:
            with self._changed:
                return self._core.queue_length_failed(e)

    def _post(self, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        request = urllib.request.Request(
            url, data=body, headers=headers(self.config), method="POST"
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as e:
            # Not an I/O failure: the controller answered with an error status.
            try:
                return e.code, e.read()
            finally:
                e.close()

    def _unregister(self) -> None:
        try:
            status, body = self._post(
                *self._core.unregister_request(), self.config.unregister_timeout
            )
        except Exception as e:
            self._core.on_unregister_failed(e)
            return
        self._core.on_unregister_answer(status, body)
