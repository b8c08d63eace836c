"""The streaming relay between a client and the worker chosen for it.

A relay forwards whole NUL-terminated messages as soon as they arrive and never buffers a
response to its end. Before anything has reached the client, a failure becomes a single
in-band error message; after, the client gets the messages already relayed followed by the
error message, so every client sees a well-formed stream. The worker side of a stream is
:class:`~controller._upstream.Upstream`; single-document calls go through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from . import protocol
from ._upstream import MAX_MESSAGE_SIZE, Pool, Upstream

__all__ = [
    "MAX_MESSAGE_SIZE",
    "DisconnectWatch",
    "Outcome",
    "forward_request",
    "relay_stream",
    "worker_url",
]

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}


class Outcome(enum.Enum):
    """How a relayed stream ended."""

    COMPLETED = "completed"
    #: the worker could not be reached or failed before its first message
    FAILED_BEFORE_START = "failed_before_start"
    #: the worker failed or went silent after messages had been relayed
    FAILED_MIDSTREAM = "failed_midstream"
    CLIENT_GONE = "client_gone"
    #: the controller ended it (shutting down); says nothing about the worker
    ABORTED = "aborted"


def worker_url(worker_name: str, path: str) -> str:
    """The URL of ``path`` on a worker, whether or not its name ends with a slash."""
    return worker_name.rstrip("/") + path


class DisconnectWatch:
    """Notices clients that vanished while their worker is silent, and ends relays on shutdown.

    A client that disconnects is noticed on the next write, but a worker that is thinking,
    queueing the request or hung writes nothing, and aiohttp does not cancel handlers by
    default. One task checks every relay's client connection a few times a second and
    stops the relays whose client is gone by dropping their connection to the worker, which
    ends the relay at once whether or not the worker has started to answer.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        # Keyed by id(): requests are mutable mappings, so not hashable.
        self._relays: dict[int, tuple[web.BaseRequest, Callable[[], object]]] = {}

    def add(self, request: web.BaseRequest, stop: Callable[[], object]) -> None:
        """Watch ``request``'s client; ``stop`` ends its relay (replacing any earlier one)."""
        self._relays[id(request)] = (request, stop)

    def discard(self, request: web.BaseRequest) -> None:
        self._relays.pop(id(request), None)

    def sweep(self) -> int:
        """Stop every relay whose client is gone; returns how many."""
        stopped = 0
        for key, (request, stop) in list(self._relays.items()):
            if client_gone(request):
                del self._relays[key]
                stop()
                stopped += 1
        return stopped

    def close_all(self) -> int:
        """Stop every relay; streams end with the in-band error message."""
        relays, self._relays = self._relays, {}
        for _, stop in relays.values():
            stop()
        return len(relays)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._relays:
                self.sweep()


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def relay_stream(
    request: web.Request,
    worker_name: str,
    body: bytes,
    *,
    connect_timeout: float,
    read_timeout: float,
    error_code: int,
    watch: DisconnectWatch,
    pool: Pool,
) -> tuple[web.StreamResponse, Outcome]:
    """Relay ``POST {worker}/worker_generate_stream`` to the client; never raises for I/O.

    Returns the response (already written) and how the stream ended. ``read_timeout`` bounds
    the worker's silence (waiting for its answer included), not the stream's length.
    """
    target = pool.target(worker_name, "/worker_generate_stream")
    if target is None:
        log.debug("worker %s has no http(s) address", worker_name)
        return _error_response(error_code), Outcome.FAILED_BEFORE_START
    fresh = False
    while True:
        upstream = pool.acquire(target, read_timeout, fresh=fresh)
        upstream.start(target, body, connect_timeout)
        watch.add(request, upstream.stop)
        try:
            relayed = await _pump(request, upstream, worker_name, error_code, watch)
        finally:
            watch.discard(request)
            upstream.close()
        if relayed is not None:
            return relayed
        # A kept-alive connection the worker had closed: once more on a new one.
        fresh = True


async def _pump(
    request: web.Request,
    upstream: Upstream,
    worker_name: str,
    error_code: int,
    watch: DisconnectWatch,
) -> tuple[web.StreamResponse, Outcome] | None:
    """Run one relay to its end; ``None`` if it should be tried again on a new connection."""
    # The client's response starts with the worker's first whole message, so a worker that
    # fails before it can still be answered with a plain in-band error (or retried). From
    # then on the upstream protocol writes each message to the client itself; this task
    # wakes only when the client must be waited for, and at the end.
    response: web.StreamResponse | None = None
    writer: AbstractStreamWriter | None = None
    while True:
        await upstream.waiter
        upstream.waiter = asyncio.get_running_loop().create_future()
        try:
            if upstream.staged and response is None:
                response = web.StreamResponse()
                if request.version >= aiohttp.HttpVersion11:
                    # Chunked framing, which the upstream then writes for each message.
                    response.enable_chunked_encoding()
                writer = await response.prepare(request)
                while upstream.staged:
                    # Headers and the first messages leave in one write.
                    staged, upstream.staged = upstream.staged, []
                    await response.write(b"".join(staged))
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client gone")
                upstream.attach(transport, request.protocol, response.chunked)
            if upstream.draining and writer is not None:
                await writer.drain()
                upstream.resume()
        except ConnectionResetError:
            return response or web.Response(), Outcome.CLIENT_GONE
        if upstream.ended:
            break

    if upstream.client_left or client_gone(request):
        return response or web.Response(), Outcome.CLIENT_GONE
    if upstream.stopped:
        # Only the shutdown stops a relay whose client is still there.
        if response is None:
            return _error_response(error_code), Outcome.ABORTED
        tail, outcome = protocol.stream_error(error_code), Outcome.ABORTED
    elif upstream.stale and response is None:
        return None
    elif upstream.failure is not None:
        log.debug("stream from %s failed: %r", worker_name, upstream.failure)
        if response is None:
            return _error_response(error_code), Outcome.FAILED_BEFORE_START
        tail, outcome = protocol.stream_error(error_code), Outcome.FAILED_MIDSTREAM
    else:
        # A last message without its NUL still counts as a message (FastChat relays it).
        pending = upstream.pending
        tail, outcome = (pending + b"\0" if pending else b""), Outcome.COMPLETED
    if response is None:
        return web.Response(body=tail), outcome
    try:
        if tail:
            await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        return response, Outcome.CLIENT_GONE
    return response, outcome


async def forward_request(
    session: aiohttp.ClientSession,
    worker_name: str,
    path: str,
    body: bytes,
    *,
    client_timeout: aiohttp.ClientTimeout,
) -> bytes | None:
    """POST ``body`` to ``path`` on a worker; its answer, or ``None`` if it failed.

    Used for the worker endpoints that answer with one JSON document. Any answer but an
    HTTP 200 counts as a failure, which the caller turns into an in-band error.
    """
    url = worker_url(worker_name, path)
    try:
        async with session.post(
            url, data=body, headers=_JSON_HEADERS, timeout=client_timeout
        ) as response:
            if response.status != 200:
                log.debug("worker %s answered %s with HTTP %d", worker_name, path, response.status)
                return None
            return await response.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.debug("worker %s failed %s: %r", worker_name, path, e)
        return None


def _error_response(error_code: int) -> web.Response:
    return web.Response(body=protocol.stream_error(error_code))
