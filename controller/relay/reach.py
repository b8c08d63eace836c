"""What a relay needs to reach a worker: the pool, the byte budget, the watch for departed
clients, and the timeouts; and sending one request through them."""

from __future__ import annotations

import asyncio
import logging

import attrs
from aiohttp import web

from ..requestid import HEADER, REQUEST_ID
from .budget import Budget
from .pool import Pool
from .tally import RelayTally
from .target import Target
from .upstream import Upstream
from .via import Via
from .watch import DisconnectWatch

__all__ = ["Reach"]

log = logging.getLogger(__name__)

#: a WARNING that requests wait for a connection to a worker is logged at most this often
WAIT_WARNING_EVERY = 60.0
_ID_LINE = HEADER.encode("ascii") + b": "


@attrs.frozen
class Reach:
    """Shared by every relay of one controller while it runs.

    ``connect_timeout`` bounds connecting to a worker, waiting for a free connection slot
    included (``--max-worker-connections``); ``read_timeout`` bounds its silence (waiting
    for its answer included), never the length of the answer.
    """

    pool: Pool[Upstream]
    budget: Budget
    watch: DisconnectWatch
    connect_timeout: float
    read_timeout: float
    #: this controller's Via entry, added to the client's on every request relayed
    via: Via = attrs.field(factory=Via)
    #: what the relays count (messages relayed, failovers, stream timings)
    tally: RelayTally = attrs.field(factory=RelayTally)

    #: when the last WARNING about waiting for a connection was logged (loop time)
    _warned_at: list[float] = attrs.field(factory=lambda: [-WAIT_WARNING_EVERY], init=False)

    async def send(
        self,
        target: Target,
        body: bytes | bytearray,
        request: web.BaseRequest | None,
        *,
        fresh: bool = False,
        document_limit: int = 0,
    ) -> Upstream:
        """Send ``body`` to ``target`` on a kept-alive connection (a new one if ``fresh``),
        watching ``request``'s client; the answer arrives through the returned upstream.

        Every connection slot taken, it waits for one up to ``connect_timeout``; then the
        upstream comes back ``refused`` (the controller's limit, not the worker's fault)."""
        pool = self.pool
        upstream = None if fresh else pool.acquire(target, self.read_timeout)
        if upstream is None:
            if pool.take_slot():
                upstream = Upstream.new(pool, self.read_timeout, self.budget, True)
            else:
                upstream = await self._wait(target, fresh)
        if upstream.ended:  # refused: no slot came free
            return upstream
        head = self.via.head(request.headers if request is not None else None)
        request_id = REQUEST_ID.get()
        if request_id is not None:
            # Only ids of letters, digits, '.', '_' and '-' are ever set: ASCII as it is.
            head += _ID_LINE + request_id.encode("ascii") + b"\r\n"
        upstream.start(target, body, self.connect_timeout, document_limit, head)
        if request is not None:
            self.watch.add(request, upstream.stop)
        return upstream

    def release(self, upstream: Upstream, request: web.BaseRequest | None) -> None:
        """Stop watching ``request`` and give the connection back (or drop it)."""
        if request is not None:
            self.watch.discard(request)
        upstream.close()

    async def _wait(self, target: Target, fresh: bool) -> Upstream:
        pool = self.pool
        loop = asyncio.get_running_loop()
        if loop.time() - self._warned_at[0] >= WAIT_WARNING_EVERY:
            self._warned_at[0] = loop.time()
            log.warning(
                "Every connection to workers is in use (%d, max_worker_connections less the "
                "probes' share): requests wait up to %g s for one",
                pool.max_open,
                self.connect_timeout,
            )
        waiter = pool.wait(None if fresh else target.key)
        try:
            # Shielded: the waiter stays pending (never cancelled) until stop_waiting, so
            # what the pool hands it meanwhile is passed on, not lost.
            async with asyncio.timeout(self.connect_timeout):
                got = await asyncio.shield(waiter)
        except TimeoutError:
            pool.stop_waiting(waiter)
            got = False
        except asyncio.CancelledError:
            pool.stop_waiting(waiter)
            raise
        if got is True:
            return Upstream.new(pool, self.read_timeout, self.budget, True)
        if got is False:
            log.debug("no connection to %s free in %g s", target.host, self.connect_timeout)
            return Upstream.new(pool, self.read_timeout, self.budget, False)
        got.reuse(self.read_timeout)
        return got
