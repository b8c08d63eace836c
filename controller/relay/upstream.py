"""The worker side of a relayed stream, below aiohttp: one connection, parsed in place.

Relaying is the controller's hottest path: a token costs a read from the worker and a write
to the client. Through aiohttp's client, each token also wakes the handler task, goes
through a stream reader and re-arms a read timer; here the token is forwarded from the
worker connection's ``data_received`` callback straight to the client's transport, and the
handler task wakes only to start the response, to wait for a slow client, and at the end.
That halves the controller's CPU time per relayed token (see docs/performance.md).

:class:`Upstream` speaks just enough HTTP/1.1 for one request at a time on a kept-alive
connection: it sends the request, reads the status line and headers, and decodes a chunked,
length-delimited or close-delimited body; :class:`Pool` keeps the idle connections. It
forwards whole NUL-terminated messages only, so a client never sees half a message.
The relay that drives it (:mod:`controller.relay.stream`) waits with :meth:`Upstream.wait`
and reads its outcome from a few flags.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from .framing import ResponseFraming, UpstreamError
from .pool import Pool
from .target import Target

__all__ = ["MAX_MESSAGE_SIZE", "Upstream"]

#: a worker that sends this much without a single NUL is not speaking the protocol
MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class Upstream(asyncio.Protocol):
    """One connection to a worker, serving one relayed request at a time.

    The relay reads the state below after each :meth:`wait`. Before :meth:`attach`,
    whole messages are kept for :meth:`take_staged`; after, they go straight to the
    client's transport. When a response ends cleanly, :meth:`close` returns the
    connection to its :class:`Pool` for the next request.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, pool: Pool[Upstream]
    ) -> None:
        self._loop = loop
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._key: tuple[str, int, bool] | None = None
        self._connect: asyncio.Future[Any] | None = None
        self._request = b""
        #: the connection served an earlier request (it may have been closed meanwhile)
        self.reused = False
        #: in the pool, between requests
        self.idle = False
        self.idle_since = 0.0
        self._reset(timeout)

    def _reset(self, timeout: float) -> None:
        """The per-request state."""
        self._timeout = timeout
        self._framing = ResponseFraming()
        #: received bytes since the last NUL: the start of a message still arriving
        self.pending = b""
        #: whole messages waiting for the relay (before :meth:`attach`)
        self._staged: list[bytes] = []
        self._sink: asyncio.BaseTransport | None = None
        self._sink_protocol: Any = None
        self._sink_chunked = True
        #: resolved (with None) whenever the relay has something to do
        self._waiter: asyncio.Future[None] = self._loop.create_future()
        #: the response ended, one way or another (see ``completed``/``failure``/``stopped``)
        self.ended = False
        self.completed = False
        self.failure: BaseException | None = None
        #: the watch stopped this relay (client gone, or shutting down)
        self.stopped = False
        #: the client's transport was closing when a message was to be written
        self.client_left = False
        #: the client stopped reading; the handler waits for it, then calls :meth:`resume`
        self.draining = False
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: any byte of this response has arrived
        self._received = False

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
        return b"".join(staged)

    @property
    def stale(self) -> bool:
        """A reused connection failed before any byte of the answer: the worker had closed
        it between requests, so the request can safely go again on a new connection."""
        return self.reused and not self._received and self.failure is not None

    def start(self, target: Target, body: bytes, connect_timeout: float) -> None:
        """Send the request (connecting first unless reused); results arrive through the
        state."""
        self._key = target.key
        request = target.request_head(len(body), self._pool.extra_head) + body
        if self.reused and self.transport is not None:
            self._send(self.transport, request)
            return
        self._request = request
        self._connect = asyncio.ensure_future(self._open(target))
        self._connect.add_done_callback(self._connected)
        self._timer = self._loop.call_later(connect_timeout, self._connect_timed_out)

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

    def attach(
        self, request_transport: asyncio.BaseTransport, protocol: Any, chunked: bool
    ) -> None:
        """From now on, write messages straight to the client (its response has started)."""
        self._sink, self._sink_protocol, self._sink_chunked = request_transport, protocol, chunked
        staged, self._staged = self._staged, []
        for message in staged:
            self._write(message)

    def resume(self) -> None:
        """The client caught up: read from the worker again."""
        self.draining = False
        if self.transport is not None and not self.ended:
            self.transport.resume_reading()

    def stop(self) -> None:
        """End the relay now (the watch calls this); the handler decides what it means."""
        if not self.ended:
            self.stopped = True
            self._end()

    def close(self) -> None:
        """Release the connection: back to the pool if the response ended cleanly, else
        dropped, which tells the worker its client is gone and it can stop generating."""
        if self._connect is not None and not self._connect.done():
            self._connect.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if transport is None:
            return
        if not self.completed:
            transport.abort()
        elif self._framing.reusable and self._key is not None and not transport.is_closing():
            self.idle = True
            self._sink = self._sink_protocol = None
            self._pool.release(self, self._key)
        else:
            transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.ended:  # stopped while connecting
            transport.abort()
            return
        request, self._request = self._request, b""
        self._send(transport, request)

    def _send(self, transport: asyncio.Transport, request: bytes) -> None:
        transport.write(request)
        self._last_data = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last_data + self._timeout, self._check_silence)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            if self.idle and self.transport is not None:
                self.transport.close()  # nothing is due between requests
            else:
                self._framing.spoil()
            return
        self._received = True
        self._last_data = self._loop.time()
        framing = self._framing
        if framing.at_chunk_start and not self.pending:
            # The common case: exactly one chunk holding whole messages.
            end = data.find(b"\r\n")
            try:
                size = int(data[:end], 16) if end > 0 else -1
            except ValueError:
                size = -1
            if size > 0 and end + size + 4 == len(data) and data[-3] == 0 and data[-2:] == b"\r\n":
                if self._sink is not None and self._sink_chunked:
                    self._to_client(data)  # the worker's chunk is the client's chunk
                else:
                    self._message(data[end + 2 : -2])
                return
        try:
            body = framing.feed(data)
        except UpstreamError as e:
            self._fail(e)
            return
        if body:
            self._body(body)
        if framing.done and not self.ended:
            self.completed = True
            self._end()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.ended:
            return
        if self._framing.until_close:
            self.completed = True
            self._end()
        else:
            self._fail(UpstreamError(f"worker closed the connection: {exc or 'EOF'}"))

    def pause_writing(self) -> None:  # the request is small; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # -- internals -----------------------------------------------------------------------

    def _connected(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None and not self.ended:
            self._fail(error)

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self.transport is None and not self.ended:
            self._fail(TimeoutError("connecting to the worker timed out"))

    def _check_silence(self) -> None:
        self._timer = None
        if self.ended:
            return
        deadline = self._last_data + self._timeout
        if self.draining or self._loop.time() < deadline:
            # Data came since this timer was set (or the client is the slow one).
            next_at = max(deadline, self._loop.time() + 0.001)
            self._timer = self._loop.call_at(next_at, self._check_silence)
            return
        self._fail(TimeoutError(f"worker silent for {self._timeout:g} s"))

    def _body(self, data: bytes) -> None:
        """Split received body bytes into whole messages and hand those on."""
        if not self.pending and data[-1] == 0:
            self._message(data)
            return
        cut = data.rfind(b"\0") + 1
        if not cut:
            self.pending += data
            if len(self.pending) > MAX_MESSAGE_SIZE:
                self._fail(UpstreamError("worker sent a message larger than 16 MiB"))
            return
        out, self.pending = self.pending + data[:cut], data[cut:]
        self._message(out)

    def _message(self, data: bytes) -> None:
        if self._sink is None:
            self._staged.append(data)
            self._wake()
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Write whole messages to the client, framed as its response is."""
        if self._sink_chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._to_client(data)

    def _to_client(self, framed: bytes) -> None:
        sink = self._sink
        assert sink is not None
        if sink.is_closing():
            self._client_gone()
            return
        sink.write(framed)  # type: ignore[attr-defined]
        if self._sink_protocol.writing_paused:
            self._pause()

    def _pause(self) -> None:
        if not self.draining and self.transport is not None:
            self.draining = True
            self.transport.pause_reading()
            self._wake()

    def _client_gone(self) -> None:
        self.client_left = True
        self._end()

    def _fail(self, error: BaseException) -> None:
        self.failure = error
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
