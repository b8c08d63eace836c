"""Idle keep-alive connections to workers, shared by the relays."""

from __future__ import annotations

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


class Pool(Generic[C]):
    """Idle keep-alive connections to workers, most recently used first.

    A connection returns here only after a response that ended cleanly and that the worker
    did not mark ``Connection: close``. Connections idle longer than ``IDLE_TIMEOUT`` are
    closed by :meth:`prune` (the controller calls it every second) or when met.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: ages idle connections (monotonic seconds; injected so tests can age them)
        self.clock = clock
        self._idle: dict[tuple[str, int, bool], list[C]] = {}
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

    def release(self, connection: C, key: tuple[str, int, bool]) -> None:
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

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.discard()
