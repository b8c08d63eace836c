"""What a relay needs to reach a worker: the pool, the byte budget, the watch for departed
clients, and the timeouts; and sending one request through them."""

from __future__ import annotations

import attrs
from aiohttp import web

from ..requestid import HEADER, REQUEST_ID
from .budget import Budget
from .pool import Pool
from .target import Target
from .upstream import Upstream
from .via import Via
from .watch import DisconnectWatch

__all__ = ["Reach"]

_ID_LINE = HEADER.encode("ascii") + b": "


@attrs.frozen
class Reach:
    """Shared by every relay of one controller while it runs.

    ``connect_timeout`` bounds connecting to a worker; ``read_timeout`` bounds its silence
    (waiting for its answer included), never the length of the answer.
    """

    pool: Pool[Upstream]
    budget: Budget
    watch: DisconnectWatch
    connect_timeout: float
    read_timeout: float
    #: this controller's Via entry, added to the client's on every request relayed
    via: Via = attrs.field(factory=Via)

    def send(
        self,
        target: Target,
        body: bytes,
        request: web.BaseRequest | None,
        *,
        fresh: bool = False,
        document_limit: int = 0,
    ) -> Upstream:
        """Send ``body`` to ``target`` on a kept-alive connection (a new one if ``fresh``),
        watching ``request``'s client; the answer arrives through the returned upstream."""
        upstream = Upstream.for_request(self.pool, target, self.read_timeout, self.budget, fresh)
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
