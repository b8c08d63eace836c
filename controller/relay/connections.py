"""The controller's connections to workers: one aiohttp session and the relay's own pool."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import aiohttp

from ..config import ControllerConfig
from ..errors import NotRunningError
from ..worker.tokens import authorization
from .guard import AddressGuard
from .pool import Pool
from .upstream import Upstream

__all__ = ["WorkerConnections", "probe_share"]


def probe_share(max_connections: int) -> int:
    """How many of ``max_connections`` the aiohttp session (status probes, load polls) may
    hold; the relay's pool holds the rest."""
    return max(1, max_connections // 8)


class WorkerConnections:
    """Opened when the controller starts and closed when it stops.

    The aiohttp ``session`` carries status probes and load polls (the parent link has a
    session of its own); its default ``timeout`` should bound a worker's silence, not the
    length of its answer. The ``pool`` keeps the relay's kept-alive connections (streams
    and single-document calls); ``clock`` ages them (injected so tests need not wait).
    Both send ``token`` as a bearer token with every request, and verify https workers
    against the CA certificates in ``ca_certs`` when given. Both connect only to
    addresses ``guard`` (the worker address policy) allows, checked on every connection.

    Together they hold at most ``max_connections`` connections open: the session an eighth
    of them (:func:`probe_share`), each closed once its answer is read, so none sits idle
    uncounted; the pool the rest, idle ones included (see :class:`Pool`). A probe takes
    one of ``probe_slots`` before its timeout starts, so probes queued behind silent
    workers wait their turn instead of failing.
    """

    def __init__(
        self,
        timeout: aiohttp.ClientTimeout,
        clock: Callable[[], float] = time.monotonic,
        *,
        token: str | None = None,
        ca_certs: str | None = None,
        guard: AddressGuard | None = None,
        max_connections: int = 1024,
    ) -> None:
        self._timeout = timeout
        self.max_connections = max_connections
        self._clock = clock
        self._headers = authorization(token)
        self._ca_certs = ca_certs
        self.guard = guard if guard is not None else AddressGuard()
        #: verifies https workers (``None``: the system's trust store); made by open()
        self.ssl_context: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool[Upstream] | None = None
        #: the session's connections (status probes, load polls) open at once; made by open()
        self.probe_slots = asyncio.Semaphore(probe_share(max_connections))

    @classmethod
    def of(cls, cfg: ControllerConfig, clock: Callable[[], float]) -> WorkerConnections:
        """The connections a controller configured by ``cfg`` holds to its workers."""
        # No total: a long generation that keeps producing must never be cut.
        stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.status_probe_timeout, sock_read=cfg.worker_api_timeout
        )
        return cls(
            stream_timeout,
            clock,
            token=cfg.upstream_token,
            ca_certs=cfg.worker_ca_certs,
            guard=AddressGuard(cfg.worker_networks),
            max_connections=cfg.max_worker_connections,
        )

    def open(self) -> None:
        """Create the session and the pool (on the running loop)."""
        asyncio.get_running_loop()  # fail early outside a loop, as aiohttp would later
        if self._ca_certs is not None:
            self.ssl_context = ssl.create_default_context(cafile=self._ca_certs)
        # aiohttp's limit counts connections in use, not idle kept-alive ones: closing each
        # after its answer makes it a bound on every socket the session holds. A probe
        # waiting for one waits within its own timeout.
        share = probe_share(self.max_connections)
        self.probe_slots = asyncio.Semaphore(share)
        connector = aiohttp.TCPConnector(
            limit=share,
            force_close=True,
            enable_cleanup_closed=False,
            ssl=self.ssl_context or True,
            socket_factory=self.guard.socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            headers=self._headers,
        )
        pool: Pool[Upstream] = Pool(self._clock, self.max_connections - share)
        self._pool = pool
        pool.ssl_context = self.ssl_context
        pool.guard = self.guard
        pool.extra_head = b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in self._headers.items()
        )

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @property
    def is_open(self) -> bool:
        return self._session is not None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise NotRunningError("the controller is not running: start() or serve() it first")
        return self._session

    @property
    def pool(self) -> Pool[Upstream]:
        """Kept-alive connections to workers for relayed streams."""
        if self._pool is None:
            raise NotRunningError("the controller is not running: start() or serve() it first")
        return self._pool
