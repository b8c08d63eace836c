"""The standalone controller's listening socket and the client connections it accepts: how
long a request head, a request body and a kept-alive wait may take, and how many
connections are held, in all and from one source address.

aiohttp bounds none of these (its keep-alive timer starts only after a response, and data
trickling in never trips it), so the controller listens with a protocol factory of its own,
on listening sockets that take new connections a few per turn (:mod:`.accepting`).
Each accepted connection is a :class:`_Client` wrapped around the protocol aiohttp's
low-level ``web.Server`` makes (a documented protocol factory); it forwards every event and
adds one timer per connection, moved lazily: a deadline is a float stored on the
connection, and the timer, when it fires early, only re-arms itself. The request's
lifecycle comes from wrapping the server's public ``request_handler`` attribute (one
coroutine frame per request, which also gives each request its id and counts its answer:
:class:`~controller.edge.request_ids.Tagging`), read by aiohttp's protocol when it is made.
Nothing here reaches below aiohttp's public API. A read costs a phase check and
:class:`~controller.edge.fair_reads.FairReads`' count; a request, one frame, a few stores
and the tagging's calls.

A connection is, in turn:

* ``HEAD``: opened, or sending the head of its next request: closed ``header_timeout``
  after it opened or after the first byte of that head, whatever trickles in meanwhile;
* ``BODY``: the head is in and the body is still arriving: ``body_timeout`` after the head,
  the body's reader gets :class:`~controller.errors.BodyTimeoutError` (the handlers answer
  408, and aiohttp closes the connection since the body was never read to its end);
* ``BUSY``: a request in progress, however long its answer streams: never timed out here;
* ``IDLE``: between requests: closed after ``idle_timeout`` unless a byte of the next
  head comes.

``HEAD`` and ``IDLE`` connections are *reusable*, oldest first: at ``max_connections`` a new
connection closes the oldest reusable one to make room (as nginx does), and is refused only
when every connection held has a request in progress. A source address past
``max_connections_per_source`` is refused at once. A refusal is a canned HTTP 503 written
as the connection opens, then a close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from ..errors import BodyTimeoutError
from ..pacing import Pacer
from .accepting import Listener
from .fair_reads import FairReads
from .listening import ClientLimits, LimitsReport, refusals
from .request_ids import Tagging

__all__ = ["ClientConnections", "ClientLimits"]

log = logging.getLogger(__name__)

HEAD, BODY, BUSY, IDLE, CLOSED = range(5)
#: a timer that fires this early counts as on time (uvloop's clock ticks in milliseconds)
_SLACK = 0.001
TIME_UPS_PER_TURN = 8  # connections whose time is up dealt with in one turn, at most
#: client reads handed to aiohttp in one turn of the loop (see fair_reads.py): at least 16
#: (what RESET_AFTER leaves), so the dispatch benchmark's 16 clients are never held; a burst
#: of 64 a turn made turns of several milliseconds, each a normal request's wait
READS_PER_TURN = 24

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Client(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, and where its request is."""

    __slots__ = (
        "_inner",
        "_owner",
        "_timer",
        "body",
        "deadline",
        "discarding",
        "held",
        "held_paused",
        "phase",
        "source",
        "timer_at",
        "transport",
    )

    def __init__(self, owner: ClientConnections) -> None:
        self._owner = owner
        #: aiohttp's protocol once admitted; a refused connection keeps a silent stand-in
        self._inner: asyncio.Protocol = _NOTHING
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.phase = HEAD
        #: when the current phase's time is up (loop time), or None
        self.deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: when the timer fires (loop time), or None when there is none
        self.timer_at: float | None = None
        #: the body still arriving (in ``BODY``)
        self.body: Any = None
        #: reads waiting for their turn (see FairReads)
        self.held: list[bytes | memoryview] | None = None
        self.held_paused = False
        #: its body was refused (413): what comes is dropped as it comes, never parsed
        self.discarding = False

    # -- asyncio.Protocol: everything goes on to aiohttp's protocol ------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        inner = self._owner.admit(self)
        if inner is not None:
            self._inner = inner
            inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            # Dropped, the socket read again in turn with other refused bodies' (held
            # reads are dropped by deliver): 13 of them at once were 3 MiB a turn.
            self._owner.reads.dropped(self)
            return
        if self.phase == IDLE:
            # The first byte of the next request: the head's time starts. The timer needs
            # no moving: armed when the connection went idle, and re-armed when it fires
            # early, no later than a head beginning since could end (see _handle and
            # next_check), it fires by this deadline.
            owner = self._owner
            self.phase = HEAD
            self.deadline = owner.loop.time() + owner.header_timeout
        if self._owner.reads.received(self, data):
            self._inner.data_received(data)

    def deliver(self, data: bytes) -> None:
        if not self.discarding:  # held since, then its body refused
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._owner.reads.flush(self)
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.reads.flush(self, deliver=False)
        self._owner.forget(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the one timer ---------------------------------------------------------------------

    def expire_at(self, deadline: float | None, loop: asyncio.AbstractEventLoop) -> None:
        """Set the phase's deadline; the timer moves only when it would fire too late."""
        self.deadline = deadline
        if deadline is not None:
            self.arm(deadline, loop)

    def arm(self, at: float, loop: asyncio.AbstractEventLoop) -> None:
        """Have the timer fire at ``at`` (no later than the deadline), if it would fire
        later or not at all."""
        if self.timer_at is None or at < self.timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(at, self._on_timer)
            self.timer_at = at

    def _on_timer(self) -> None:
        self._timer = self.timer_at = None
        deadline = self.deadline
        if deadline is None or self.phase == CLOSED:
            return
        owner = self._owner
        loop = owner.loop
        now = loop.time()
        if now < deadline - _SLACK:
            self.arm(owner.next_check(self, now), loop)
            return
        self.deadline = None
        owner.time_up(self)

    def stop_timer(self) -> None:
        self.deadline = self.timer_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_NOTHING = asyncio.Protocol()


class ClientConnections:
    """The client connections of one listening socket, and their bounds.

    Made from an ``AppRunner``'s (set up) low-level server, whose ``request_handler`` it
    wraps, and the ``tagging`` of its requests; :meth:`listen` opens the socket.
    ``held`` counts the connections held now.
    """

    def __init__(self, server: web.Server, limits: ClientLimits, tagging: Tagging) -> None:
        self.loop = asyncio.get_running_loop()
        #: gives each request its id and counts its answer
        self._tagging = tagging
        self.limits = limits
        self._idle_timeout = limits.idle_timeout
        self.header_timeout = limits.header_timeout
        #: the soonest an idle connection's deadline can fall: its idle time, or a head's
        self._first_deadline = min(limits.idle_timeout, limits.header_timeout)
        self._server = server
        self._handler: _Handler = server.request_handler
        # The server's requests are an application's, web.Request objects (its
        # request_factory makes them); the attribute's type says BaseRequest.
        server.request_handler = self._handle  # type: ignore[assignment]
        self.held = 0
        #: connections held per source address
        self._per_source: dict[str, int] = {}
        #: reads handed to aiohttp a slice per loop turn, fairly between source addresses
        self.reads = FairReads(self.loop, READS_PER_TURN, self._per_source)
        #: connections idle or sending a head, the one longest so first
        self._reusable: dict[_Client, None] = {}
        self._listener: Listener | None = None
        self._per_source_refusal, self._full_refusal = refusals(limits)
        #: refusals and evictions, logged now and then
        self._report = LimitsReport(limits)
        self._time_ups = Pacer(TIME_UPS_PER_TURN)

    async def listen(
        self, host: str | None, port: int, *, ssl_context: ssl.SSLContext | None, backlog: int
    ) -> None:
        """Open the listening socket; its connections are this object's from now on, taken
        a few per turn (see accepting.py). A TLS handshake must end within
        ``header_timeout`` (it comes before the head)."""
        listener = Listener(
            self.loop,
            lambda: _Client(self),
            ssl_context=ssl_context,
            handshake_timeout=self.limits.header_timeout,
            room=lambda: self.limits.max_connections - self.held,
        )
        await listener.open(host, port, backlog)
        self._listener = listener

    @property
    def addresses(self) -> list[Any]:
        """The listening socket's addresses (``getsockname()`` of each)."""
        if self._listener is None:
            return []
        return [sock.getsockname() for sock in self._listener.sockets]

    def close(self) -> None:
        """Stop accepting connections (those held are the runner's to close)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    # -- a connection's life ----------------------------------------------------------------

    def admit(self, client: _Client) -> asyncio.Protocol | None:
        """Count a new connection in, making room if need be; aiohttp's protocol for it, or
        ``None`` when it is refused (answered 503 and closed)."""
        transport = client.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        source = client.source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        limits = self.limits
        per_source = self._per_source.get(source, 0)
        if per_source >= limits.max_connections_per_source:
            self._refuse(client, self._per_source_refusal, "refused past the per-source cap")
            return None
        if self.held >= limits.max_connections:
            oldest = next(iter(self._reusable), None)
            if oldest is None:
                self._refuse(client, self._full_refusal, "refused, all busy")
                return None
            self._note("idle or slow closed to make room")
            self.close_client(oldest)
        self.held += 1
        self._per_source[source] = per_source + 1
        self._reusable[client] = None
        client.expire_at(self.loop.time() + limits.header_timeout, self.loop)
        return cast(asyncio.Protocol, self._server())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """aiohttp's request handler, with the connection told when a request starts (its
        head is complete) and ends, and the request tagged. Every request passes here."""
        tagging = self._tagging
        value = tagging.begin(request)
        transport = request.transport
        client = transport.get_protocol() if transport is not None else None
        if type(client) is not _Client or client.phase == CLOSED:
            client = None
        else:
            self._reusable.pop(client, None)
            body = request.content
            if body.is_eof():
                client.phase = BUSY
                client.deadline = None
            else:
                client.phase = BODY
                client.body = body
                client.expire_at(self.loop.time() + self.limits.body_timeout, self.loop)
        try:
            response = await self._handler(request)
        except web.HTTPException as e:
            tagging.refused(request, e, value)
            if e.status == 413 and client is not None:
                # aiohttp reads a refused body to its end before closing (so that the
                # client, still sending, gets to read its 413), up to 10 s: the rest is
                # dropped here as it comes instead of parsed (1.3 GB cost a second of CPU).
                client.discarding = True
            raise
        except Exception:
            tagging.failed(request)
            raise
        finally:
            if client is not None:
                client.body = None
                if client.phase != CLOSED:
                    client.phase = IDLE
                    self._reusable[client] = None
                    now = self.loop.time()
                    client.deadline = now + self._idle_timeout
                    # Armed no later than a next head's deadline could be, so the head's
                    # beginning (nearly every request on a kept-alive connection) never
                    # moves the timer: it fires early at most once a header_timeout.
                    client.arm(now + self._first_deadline, self.loop)
        tagging.answered(request, response, value)
        return response

    def time_up(self, client: _Client) -> None:
        """A connection's phase ran out of time: dealt with now, or in a later turn past
        TIME_UPS_PER_TURN (200 slow clients timed out in one turn held the loop 23 ms)."""
        self._time_ups.call(functools.partial(self._time_up, client))

    def _time_up(self, client: _Client) -> None:
        if client.phase == CLOSED:
            return
        if client.deadline is not None:  # a new phase began while it waited its turn
            return client.arm(client.deadline, self.loop)
        if client.phase == BODY:
            body, client.body = client.body, None
            client.phase = BUSY
            if body is not None and not body.is_eof():
                timeout = self.limits.body_timeout
                log.debug("request body from %s not complete in %g s", client.source, timeout)
                body.set_exception(
                    BodyTimeoutError(
                        f"the request body did not arrive within {timeout:g} s (body_timeout)"
                    )
                )
            return
        if client.phase == HEAD or client.phase == IDLE:
            what = "request head" if client.phase == HEAD else "next request"
            log.debug("closed a connection from %s: no %s in time", client.source, what)
            self.close_client(client)

    def next_check(self, client: _Client, now: float) -> float:
        """When a connection's timer, fired early, should fire next: its deadline, or for
        an idle one, no later than the deadline of a head that began now."""
        deadline = client.deadline
        assert deadline is not None, "checked by the timer"
        if client.phase == IDLE:
            return min(deadline, now + self._first_deadline)
        return deadline

    def close_client(self, client: _Client) -> None:
        """Close a connection now; its place is free at once."""
        self.forget(client)
        if client.transport is not None:
            client.transport.close()

    def forget(self, client: _Client) -> None:
        """The connection is gone (or going): uncount it. Idempotent."""
        if client.phase == CLOSED:
            return
        client.phase = CLOSED
        client.stop_timer()
        client.body = None
        self._reusable.pop(client, None)
        self.held -= 1
        source = client.source
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    def _refuse(self, client: _Client, answer: bytes, what: str) -> None:
        client.phase = CLOSED
        self._note(what)
        transport = client.transport
        if transport is not None:
            transport.write(answer)
            transport.close()

    def _note(self, what: str) -> None:
        self._report.note(what, self.loop.time(), self.held)
