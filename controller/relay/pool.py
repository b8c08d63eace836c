"""Connections to workers, shared by the relays: the idle kept-alive ones, and how many are
open at once (``--max-worker-connections``, less the status probes' share)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from .guard import AddressGuard
from .target import Target, parse_target

__all__ = ["IDLE_TIMEOUT", "Connection", "Pool"]

#: an idle connection to a worker is closed after this long (below uvicorn's default 5 s
#: keep-alive, so the controller, not the worker, closes it: no request races a close)
IDLE_TIMEOUT = 4.0
#: idle connections kept per worker address
MAX_IDLE_PER_HOST = 256
#: parsed worker addresses remembered (the cache starts over when full)
MAX_TARGETS = 100_000


class Connection(Protocol):
    """What the pool needs of a connection (an :class:`~controller.relay.connection.Connection`)."""

    idle_since: float

    def usable(self) -> bool: ...
    def reuse(self, timeout: float) -> None: ...
    def discard(self) -> None: ...


C = TypeVar("C", bound=Connection)
#: a worker address, as connections to it are pooled: (host, port, tls)
Key = tuple[str, int, bool]


class Pool(Generic[C]):
    """Idle keep-alive connections to workers, most recently used first.

    A connection returns here only after a response that ended cleanly and that the worker
    did not mark ``Connection: close``. Connections idle longer than ``IDLE_TIMEOUT`` are
    closed by :meth:`prune` (the controller calls it every second) or when met.

    At most ``max_open`` connections are open at once, idle ones included: a new one takes
    a slot (:meth:`take_slot`) and its closing gives it back (:meth:`slot_freed`). When none
    is free, an idle connection is closed to free one, and the request waits
    (:meth:`wait`) for either a slot or a connection to its own worker coming back; a
    waiter is served first come, first served.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_open: int = 1 << 30
    ) -> None:
        #: ages idle connections (monotonic seconds; injected so tests can age them)
        self.clock = clock
        self.max_open = max_open
        #: connections open (or opening) now
        self.open = 0
        #: requests waiting for a connection, oldest first, and the same by worker address
        #: (``None``: one that must have a new connection)
        self._waiting: dict[asyncio.Future[C | bool], Key | None] = {}
        self._waiting_for: dict[Key | None, dict[asyncio.Future[C | bool], None]] = {}
        self._idle: dict[Key, list[C]] = {}
        self._targets: dict[tuple[str, str], Target | None] = {}
        #: verifies https workers; the default trust store unless replaced
        self.ssl_context: ssl.SSLContext | None = None
        #: header lines (each ending in CRLF) sent with every request, such as the
        #: upstream token's ``Authorization``
        self.extra_head = b""
        #: the worker address policy every connection's address is checked against
        self.guard = AddressGuard()
        self.closed = False

    def target(self, worker_name: str, path: str) -> Target | None:
        """Where ``path`` on a worker is (parsed once per name), or ``None`` if its name is
        not an http(s) URL."""
        key = (worker_name, path)
        try:
            return self._targets[key]
        except KeyError:
            pass
        if len(self._targets) >= MAX_TARGETS:
            self._targets.clear()
        target = self._targets[key] = parse_target(worker_name, path, self.guard)
        return target

    def tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def acquire(self, target: Target, timeout: float) -> C | None:
        """An idle connection to ``target``'s address, ready for a request taking
        ``timeout``; ``None`` when there is none."""
        idle = self._idle.get(target.key)
        if idle:
            oldest = self.clock() - IDLE_TIMEOUT
            while idle:
                connection = idle.pop()
                if connection.idle_since > oldest and connection.usable():
                    connection.reuse(timeout)
                    return connection
                connection.discard()
        return None

    def release(self, connection: C, key: Key) -> None:
        if self._waiting:
            waiters = self._waiting_for.get(key)
            if waiters:
                # Straight to a request waiting for this worker, never through the pool.
                self._hand(next(iter(waiters)), connection)
                return
            # Requests wait for other workers: closing this one frees them a slot.
            connection.discard()
            return
        idle = self._idle.setdefault(key, [])
        if self.closed or len(idle) >= MAX_IDLE_PER_HOST:
            connection.discard()
            return
        connection.idle_since = self.clock()
        idle.append(connection)

    def prune(self) -> int:
        """Close the connections idle for too long, or closed by their worker."""
        oldest = self.clock() - IDLE_TIMEOUT
        pruned = 0
        for key, idle in list(self._idle.items()):
            keep = []
            for connection in idle:
                if connection.idle_since > oldest and connection.usable():
                    keep.append(connection)
                else:
                    connection.discard()
                    pruned += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return pruned

    # -- open connections, at most max_open -------------------------------------------------

    def take_slot(self) -> bool:
        """Count a new connection in if one more may open; if none may, close an idle one
        (its slot goes to the first waiter) and say ``False``: then :meth:`wait`."""
        if self.open < self.max_open:
            self.open += 1
            return True
        while self._idle:
            key, idle = next(iter(self._idle.items()))
            connection = idle.pop(0)
            if not idle:
                del self._idle[key]
            if connection.usable():
                connection.discard()
                break
            # Closed already (its slot was given back then): forget it, try the next.
        return False

    def slot_freed(self) -> None:
        """A connection closed (or failed to open): its slot goes to the first waiter."""
        if self._waiting:
            self._hand(next(iter(self._waiting)), True)
        else:
            self.open -= 1

    def wait(self, key: Key | None) -> asyncio.Future[C | bool]:
        """A future for a request waiting to reach ``key`` (``None``: on a new connection):
        an idle connection to it, ``True`` for a slot to open one, ``False`` if the pool
        closed. Give it to :meth:`stop_waiting` if it is no longer wanted."""
        future: asyncio.Future[C | bool] = asyncio.get_running_loop().create_future()
        self._waiting[future] = key
        self._waiting_for.setdefault(key, {})[future] = None
        return future

    def stop_waiting(self, future: asyncio.Future[C | bool]) -> None:
        """The waiter of ``future`` gave up (timed out, cancelled): whatever it was handed
        goes to the next one."""
        key = self._waiting.get(future, None)
        if future in self._waiting:
            self._unlist(future, key)
        if future.done() and not future.cancelled():
            got = future.result()
            if got is True:
                self.slot_freed()
            elif not isinstance(got, bool):
                got.discard()  # its closing frees the slot

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _hand(self, future: asyncio.Future[C | bool], what: C | bool) -> None:
        self._unlist(future, self._waiting[future])
        future.set_result(what)

    def _unlist(self, future: asyncio.Future[C | bool], key: Key | None) -> None:
        del self._waiting[future]
        same = self._waiting_for[key]
        del same[future]
        if not same:
            del self._waiting_for[key]

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        self.closed = True
        for future in list(self._waiting):
            self._hand(future, False)
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.discard()
