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
Everything it needs from the handler is plain state and one future.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = ["Pool", "Target", "Upstream", "UpstreamError", "parse_target"]

#: a worker that sends this much without a single NUL is not speaking the protocol
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: status line and headers larger than this are refused
MAX_HEAD_SIZE = 64 * 1024
#: a chunk-size line (or trailer line) longer than this is refused
MAX_LINE_SIZE = 4096
#: how long a resolved host name is reused
DNS_TTL = 10.0
#: an idle connection to a worker is closed after this long (below uvicorn's default 5 s
#: keep-alive, so the controller, not the worker, closes it: no request races a close)
IDLE_TIMEOUT = 4.0
#: idle connections kept per worker address
MAX_IDLE_PER_HOST = 256
#: parsed worker addresses remembered (the cache starts over when full)
MAX_TARGETS = 100_000

# Parser states.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamError(Exception):
    """The worker broke the protocol, went silent, or the connection failed."""


class Target:
    """Where a worker's stream endpoint is: parsed once per worker name."""

    __slots__ = ("_addresses", "_resolved_at", "host", "host_header", "key", "path", "port", "ssl")

    def __init__(self, host: str, port: int, tls: bool, path: str, host_header: str) -> None:
        self.host = host
        self.port = port
        self.ssl = tls
        self.path = path
        self.host_header = host_header
        #: connections to the same address are shared between workers' names and paths
        self.key = (host, port, tls)
        self._addresses: list[str] = []
        self._resolved_at = -DNS_TTL

    def request_head(self, body_length: int) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_length}\r\n\r\n"
        ).encode("latin-1")

    async def addresses(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """The host's addresses, resolved off the loop and cached for ``DNS_TTL`` seconds."""
        if _is_ip(self.host):
            return [self.host]
        now = time.monotonic()
        if not self._addresses or now - self._resolved_at > DNS_TTL:
            infos = await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            found: list[str] = []
            for *_, sockaddr in infos:
                address = str(sockaddr[0])
                if address not in found:
                    found.append(address)
            self._addresses, self._resolved_at = found, now
        return self._addresses


def parse_target(worker_name: str, path: str) -> Target | None:
    """The :class:`Target` for ``path`` on a worker, or ``None`` if its name is no URL."""
    try:
        parts = urlsplit(worker_name.rstrip("/"))
        tls = parts.scheme == "https"
        if (tls or parts.scheme == "http") and parts.hostname:
            port = parts.port or (443 if tls else 80)
            return Target(parts.hostname, port, tls, parts.path + path, parts.netloc)
    except ValueError:  # a port out of range, say
        pass
    return None


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


class Pool:
    """Idle keep-alive connections to workers, most recently used first.

    A connection returns here only after a response that ended cleanly and that the worker
    did not mark ``Connection: close``. Connections idle longer than ``IDLE_TIMEOUT`` are
    closed by :meth:`prune` (the controller calls it every second) or when met.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._idle: dict[tuple[str, int, bool], list[Upstream]] = {}
        self._targets: dict[tuple[str, str], Target | None] = {}
        #: verifies https workers; the default trust store unless replaced
        self.ssl_context: ssl.SSLContext | None = None
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
        target = self._targets[key] = parse_target(worker_name, path)
        return target

    def tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def acquire(self, target: Target, timeout: float, *, fresh: bool = False) -> Upstream:
        """An idle connection to ``target``'s address, or a new, unconnected one."""
        idle = None if fresh else self._idle.get(target.key)
        if idle:
            oldest = self._loop.time() - IDLE_TIMEOUT
            while idle:
                upstream = idle.pop()
                if upstream.idle_since > oldest and upstream.usable():
                    upstream.reuse(timeout)
                    return upstream
                upstream.discard()
        return Upstream(self._loop, timeout, self)

    def release(self, upstream: Upstream, key: tuple[str, int, bool]) -> None:
        idle = self._idle.setdefault(key, [])
        if self.closed or len(idle) >= MAX_IDLE_PER_HOST:
            upstream.discard()
            return
        upstream.idle_since = self._loop.time()
        idle.append(upstream)

    def prune(self) -> int:
        """Close the connections idle for too long, or closed by their worker."""
        oldest = self._loop.time() - IDLE_TIMEOUT
        pruned = 0
        for key, idle in list(self._idle.items()):
            keep = []
            for upstream in idle:
                if upstream.idle_since > oldest and upstream.usable():
                    keep.append(upstream)
                else:
                    upstream.discard()
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
            for upstream in connections:
                upstream.discard()


class Upstream(asyncio.Protocol):
    """One connection to a worker, serving one relayed request at a time.

    The handler reads the state below after each wake-up of :attr:`waiter`. Before
    :meth:`attach`, whole messages are kept in :attr:`staged`; after, they go straight to
    the client's transport. When a response ends cleanly, :meth:`close` returns the
    connection to its :class:`Pool` for the next request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, pool: Pool) -> None:
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
        self._state = _HEAD
        self._buf = b""
        self._left = 0  # bytes left in the current chunk or in a length-delimited body
        #: received bytes since the last NUL: the start of a message still arriving
        self.pending = b""
        #: whole messages waiting for the handler (before :meth:`attach`)
        self.staged: list[bytes] = []
        self._sink: asyncio.BaseTransport | None = None
        self._sink_protocol: Any = None
        self._sink_chunked = True
        #: resolved (with None) whenever the handler has something to do
        self.waiter: asyncio.Future[None] = self._loop.create_future()
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
        #: the worker may take another request on this connection after this response
        self._keep_alive = True
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

    # -- driven by the handler -----------------------------------------------------------

    @property
    def stale(self) -> bool:
        """A reused connection failed before any byte of the answer: the worker had closed
        it between requests, so the request can safely go again on a new connection."""
        return self.reused and not self._received and self.failure is not None

    def start(self, target: Target, body: bytes, connect_timeout: float) -> None:
        """Send the request (connecting first unless reused); results arrive through the
        state."""
        self._key = target.key
        request = target.request_head(len(body)) + body
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
        staged, self.staged = self.staged, []
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
        elif (
            self._keep_alive
            and self._state == _DONE
            and not self._buf
            and self._key is not None
            and not transport.is_closing()
        ):
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
                self._buf = b"?"  # bytes after the response: not reusable
            return
        self._received = True
        self._last_data = self._loop.time()
        if self._state == _SIZE and not self._buf and not self.pending:
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
            body = self._parse(self._buf + data if self._buf else data)
        except UpstreamError as e:
            self._fail(e)
            return
        if body:
            self._body(body)
        if self._state == _DONE and not self.ended:
            self.completed = True
            self._end()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.ended:
            return
        if self._state == _UNTIL_CLOSE:
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

    def _parse(self, buf: bytes) -> bytes:
        """Consume ``buf``; return the body bytes it held and keep any incomplete rest."""
        pieces: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            state = self._state
            if state == _SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > MAX_LINE_SIZE:
                        raise UpstreamError("worker sent an overlong chunk-size line")
                    break
                line = buf[pos:end].split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise UpstreamError(f"worker sent a bad chunk size {line[:20]!r}") from None
                pos = end + 2
                if size < 0:
                    raise UpstreamError("worker sent a negative chunk size")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._left, self._state = size, _DATA
            elif state in (_DATA, _LENGTH):
                take = min(self._left, n - pos)
                pieces.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END if state == _DATA else _DONE
            elif state == _DATA_END:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise UpstreamError("worker sent a chunk without its CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > MAX_LINE_SIZE:
                        raise UpstreamError("worker sent an overlong trailer line")
                    break
                if end == pos:
                    self._state = _DONE
                pos = end + 2
            elif state == _UNTIL_CLOSE:
                pieces.append(buf[pos:] if pos else buf)
                pos = n
            elif state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD_SIZE:
                        raise UpstreamError("worker sent an oversized response head")
                    break
                self._head(buf[pos:end])
                pos = end + 4
            else:  # _DONE: bytes after the response; the connection cannot be trusted again
                self._keep_alive = False
                pos = n
        self._buf = buf[pos:] if pos < n else b""
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise UpstreamError(f"worker sent no HTTP status line: {lines[0][:40]!r}")
        status = int(parts[1])
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            return
        if status != 200:
            raise UpstreamError(f"worker answered HTTP {status}")
        chunked, length = False, -1
        self._keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"connection":
                if b"close" in value.lower():
                    self._keep_alive = False
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise UpstreamError("worker sent a bad Content-Length") from None
        if chunked:
            self._state = _SIZE
        elif length > 0:
            self._left, self._state = length, _LENGTH
        elif length == 0:
            self._state = _DONE
        else:
            self._state = _UNTIL_CLOSE

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
            self.staged.append(data)
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
        if not self.waiter.done():
            self.waiter.set_result(None)
