"""The worker side of a relayed request, below aiohttp: one connection, parsed by llhttp.

Relaying is the controller's hottest path: a token costs a read from the worker and a write
to the client. Through aiohttp's client, each token also wakes the handler task, goes
through a stream reader and re-arms a read timer; here the token is forwarded from the
worker connection's ``data_received`` callback straight to the client's transport, and the
handler task wakes only to start the response, to wait for a slow client, and at the end.
That halves the controller's CPU time per relayed token (see docs/performance.md).

:class:`Upstream` sends one request at a time on a kept-alive connection and decodes the
answer with :class:`~controller.relay.framing.ResponseFraming` (llhttp plus a proxy's
checks). A stream's body is forwarded as whole NUL-terminated messages only, so a client
never sees half a message; a single-document answer is collected whole, up to a limit.
:class:`Pool` keeps the idle connections. The relays that drive it
(:mod:`controller.relay.stream`, :mod:`controller.relay.forward`) wait with
:meth:`Upstream.wait` and read the outcome from a few flags.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from ..joining import Chunks
from .budget import Budget
from .framing import ResponseFraming, UpstreamError
from .holding import BULK_READ, MAX_MESSAGE_SIZE, Holding
from .pool import Pool
from .sending import Body, Sending
from .sink import ClientSink
from .target import Target

__all__ = ["MAX_MESSAGE_SIZE", "Upstream"]


class Upstream(Holding, Sending, asyncio.Protocol):
    """One connection to a worker, serving one relayed request at a time.

    The relay reads the state below after each :meth:`wait`. For a stream, before
    :meth:`attach` whole messages are kept for :meth:`take_staged`; after, they go straight
    to the client. For a single document (``start(..., document_limit=N)``), the body is
    collected in :attr:`document`. When an answer ends cleanly, :meth:`close` returns the
    connection to its :class:`Pool` for the next request; after anything malformed, never.
    Bytes held (staged messages, a message still arriving, a document) are counted in the
    shared :class:`Budget`.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, pool: Pool[Upstream], budget: Budget
    ) -> None:
        self._loop = loop
        self._pool = pool
        self._budget = budget
        self.transport: asyncio.Transport | None = None
        self._key: tuple[str, int, bool] | None = None
        self._connect: asyncio.Future[Any] | None = None
        self._request = b""
        #: the connection served an earlier request (it may have been closed meanwhile)
        self.reused = False
        #: in the pool, between requests
        self.idle = False
        self.idle_since = 0.0
        #: holds one of the pool's slots (a new connection, until it closes)
        self._slot = False
        #: connection_made was called
        self._made = False
        self._reset(timeout)

    def _reset(self, timeout: float) -> None:
        """The per-request state."""
        self._timeout = timeout
        self._framing = ResponseFraming()
        #: received bytes since the last NUL: the start of a message still arriving
        self.pending = bytearray()
        #: whole messages waiting for the relay (before :meth:`attach`)
        self._staged: list[bytes] = []
        #: bytes counted in the budget
        self._held = 0
        self._parked = False
        self._sink: ClientSink | None = None
        #: a single document's body (``None`` for a stream), and its size limit
        self.document: Chunks | None = None
        self._document_limit = 0
        self._reserved = False
        #: resolved (with None) whenever the relay has something to do
        self._waiter: asyncio.Future[None] = self._loop.create_future()
        #: the answer ended, one way or another (see ``completed``/``failure``/``stopped``)
        self.ended = False
        self.completed = False
        self.failure: BaseException | None = None
        #: why the controller refused the answer for its own limits (not the worker's fault)
        self.refused: str | None = None
        #: the watch stopped this relay (client gone, or shutting down)
        self.stopped = False
        #: the client's transport was closing when a message was to be written
        self.client_left = False
        #: the client stopped reading; the handler waits for it, then calls :meth:`resume`
        self.draining = False
        self._sent_at = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: any byte of this answer has arrived
        self._received = False
        #: the worker closed or reset the connection before sending a byte
        self._dropped = False

    @classmethod
    def new(cls, pool: Pool[Upstream], timeout: float, budget: Budget, slot: bool) -> Upstream:
        """A new connection, holding one of ``pool``'s slots (given back when it closes), or
        without one (``slot=False``) refused before it began: see ``refused``."""
        upstream = cls(asyncio.get_running_loop(), timeout, pool, budget)
        upstream._slot = slot
        if not slot:
            upstream._refuse("no connection to a worker came free in time (max_worker_connections)")
        return upstream

    # -- driven by the pool --------------------------------------------------------------

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def reuse(self, timeout: float) -> None:
        self.idle = False
        self.reused = True
        self._reset(timeout)

    def discard(self) -> None:
        self.idle = False
        if self.transport is not None:
            self.transport.close()

    # -- driven by the relay -------------------------------------------------------------

    async def wait(self) -> None:
        """Return when there is something to do: messages staged, the client to wait for
        (``draining``), or the end (``ended``)."""
        await self._waiter
        self._waiter = self._loop.create_future()

    @property
    def has_staged(self) -> bool:
        return bool(self._staged)

    def take_staged(self) -> bytes:
        """The whole messages received before :meth:`attach`, in one piece."""
        staged, self._staged = self._staged, []
        data = b"".join(staged)
        self._give_back(len(data))
        return data

    @property
    def stale(self) -> bool:
        """A reused connection the worker closed or reset before any byte of the answer:
        it had closed it between requests, so the request can safely go again on a new
        connection. A timeout is never stale: the worker may be working on the request."""
        return self.reused and self._dropped

    def start(
        self,
        target: Target,
        body: Body,
        connect_timeout: float,
        document_limit: int = 0,
        head: bytes = b"",
    ) -> None:
        """Send the request (connecting first unless reused); results arrive through the
        state. With ``document_limit``, the answer is one document of at most that many
        bytes, collected in :attr:`document`. Never raises: whatever goes wrong is the
        worker's failure before its first byte."""
        try:
            self._start(target, body, connect_timeout, document_limit, head)
        except Exception as e:  # an address that cannot be encoded, say
            self._fail(e)
            if self._connect is None:
                self._free_slot()

    def _start(
        self, target: Target, body: Body, timeout: float, document_limit: int, head: bytes
    ) -> None:
        if document_limit:
            self.document, self._document_limit = Chunks(), document_limit
        self._key = target.key
        request = self._first_write(
            target.request_head(len(body), self._pool.extra_head + head), body
        )
        if self.reused and self.transport is not None:
            self._send(self.transport, request)
            return
        self._request = request
        self._connect = asyncio.ensure_future(self._open(target))
        self._connect.add_done_callback(self._connected)
        self._timer = self._loop.call_later(timeout, self._connect_timed_out)

    async def _open(self, target: Target) -> None:
        tls = self._pool.tls() if target.ssl else None
        last: OSError | None = None
        for address in await target.addresses(self._loop):
            try:
                await self._loop.create_connection(
                    lambda: self,
                    address,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
                return
            except OSError as e:
                last = e
        raise last or OSError(f"{target.host} has no address")

    def attach(self, sink: ClientSink) -> None:
        """From now on, write messages straight to the client (its response has started)."""
        self._sink = sink
        staged, self._staged = self._staged, []
        for message in staged:
            self._give_back(len(message))
            self._write(message)

    def resume(self) -> None:
        """The client caught up: read from the worker again."""
        self.draining = False
        if self.transport is not None and not self.ended and not self._parked:
            self.transport.resume_reading()

    def stop(self) -> None:
        """End the relay now (the watch calls this); the handler decides what it means."""
        if not self.ended:
            self.stopped = True
            self._end()

    def close(self) -> None:
        """Release the connection: back to the pool if the answer ended cleanly, else
        dropped, which tells the worker its client is gone and it can stop generating."""
        if self._connect is not None and not self._connect.done():
            self._connect.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parked:
            self._parked = False
            self._budget.leave(self._budget_freed)
        self._give_back(self._held)
        transport = self.transport
        if transport is None:
            return
        if not self.completed:
            transport.abort()
        elif self._framing.reusable and self.sent and self._key and not transport.is_closing():
            self.idle = True
            self._sink = None
            self._pool.release(self, self._key)
        else:
            transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.ended:  # stopped while connecting
            transport.abort()
            return
        request, self._request = self._request, b""
        self._send(transport, request)

    def _send(self, transport: asyncio.Transport, request: bytes) -> None:
        transport.write(request)
        if self._unsent is not None:
            self._send_rest()
        self._sent_at = self._last_data = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._sent_at + self._timeout, self._check_silence)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            if self.idle and self.transport is not None:
                self.transport.close()  # nothing is due between requests
            else:
                self._framing.spoil()
            return
        self._received = True
        self._last_data = self._loop.time()
        if len(data) >= BULK_READ:
            self._yield_turn()
        framing = self._framing
        # Exactly one chunk of whole messages, from a chunk boundary: forwarded as it came
        # (it is byte for byte what the relay would write) once llhttp has accepted it.
        fast = framing.boundary and not self.pending
        framing.chunk_events = 0
        try:
            framing.feed(data)
        except UpstreamError as e:
            self._fail(e)
            return
        pieces = framing.pieces
        if self.document is not None:
            framing.pieces = []
            self._collect(pieces)
        elif pieces:
            framing.pieces = []
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            size = len(body)
            # llhttp accepted the read as one chunk of ``size`` bytes; a size line of just
            # the hex digits of ``size`` (no extension, no leading zero) makes the read the
            # very bytes the relay would write for that chunk.
            if (
                fast
                and framing.chunk_events == 2
                and framing.boundary
                and body[-1] == 0
                and len(data) == size + 4 + (size.bit_length() + 3) // 4
            ):
                if self._sink is not None and self._sink.chunked:
                    self._to_client(data)  # the worker's chunk is the client's chunk
                else:
                    self._message(body)
            else:
                self._body(body)
        if framing.done and not self.ended:
            self.completed = True
            self._end()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._free_slot()
        if self.ended:
            return
        framing = self._framing
        if framing.until_close and framing.head_done:
            self.completed = True
            self._end()
            return
        if not self._received:
            self._dropped = True
        self._fail(UpstreamError(f"worker closed the connection: {exc or 'EOF'}"))

    # -- internals -----------------------------------------------------------------------

    def _connected(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if not self._made and (error is not None or future.cancelled()):
            self._free_slot()  # no connection: no connection_lost to give the slot back
        if error is not None and not self.ended:
            self._fail(error)

    def _free_slot(self) -> None:
        if self._slot:
            self._slot = False
            self._pool.slot_freed()

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self.transport is None and not self.ended:
            self._fail(TimeoutError("connecting to the worker timed out"))

    def _check_silence(self) -> None:
        self._timer = None
        if self.ended:
            return
        if self._framing.head_done:
            deadline = self._last_data + self._timeout
        else:  # the head as a whole, however it trickles in
            deadline = self._sent_at + self._timeout
        if self.draining or self._parked or self._loop.time() < deadline:
            # Data came since this timer was set (or the relay is the one not reading).
            next_at = max(deadline, self._loop.time() + 0.001)
            self._timer = self._loop.call_at(next_at, self._check_silence)
            return
        what = "silent" if self._framing.head_done else "without a complete answer head"
        self._fail(TimeoutError(f"worker {what} for {self._timeout:g} s"))

    def _client_gone(self) -> None:
        self.client_left = True
        self._end()

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self._framing.spoil()
        self._end()

    def _end(self) -> None:
        self.ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.completed:
            if self._connect is not None and not self._connect.done():
                self._connect.cancel()
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if not self._waiter.done():
            self._waiter.set_result(None)
