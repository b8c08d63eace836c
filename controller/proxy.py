"""The streaming relay between a client and the worker chosen for it.

A relay forwards whole NUL-terminated messages as soon as they arrive and never buffers a
response to its end. Before anything has reached the client, a failure becomes a single
in-band error message; after, the client gets the messages already relayed followed by the
error message, so every client sees a well-formed stream.

Upstream reads and downstream writes sit in separate ``try`` blocks on purpose:
``aiohttp.ClientConnectionResetError`` is both a ``ClientError`` and a
``ConnectionResetError``, so one ``except`` could not tell "worker died" from "client left".
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

from . import protocol

__all__ = ["DisconnectWatch", "Outcome", "forward_request", "relay_stream", "worker_url"]

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}

# A worker that sends this much without a single NUL is not speaking the protocol.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024


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
    stops the relays whose client is gone: before the worker answered, by cancelling the
    request; after, by closing the worker's response, which ends the read at once.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        #: set by :meth:`close_all`; relays ended after it are aborted, not failed
        self.closing = False
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
        self.closing = True
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
    session: aiohttp.ClientSession,
    worker_name: str,
    body: bytes,
    *,
    client_timeout: aiohttp.ClientTimeout,
    error_code: int,
    watch: DisconnectWatch,
) -> tuple[web.StreamResponse, Outcome]:
    """Relay ``POST {worker}/worker_generate_stream`` to the client; never raises for I/O.

    Returns the response (already written) and how the stream ended.
    """
    url = worker_url(worker_name, "/worker_generate_stream")
    # A task of its own, so the watch can cancel the wait for the worker's answer (which
    # a busy worker delays until a slot frees) when the client leaves.
    connect = asyncio.ensure_future(
        session.post(url, data=body, headers=_JSON_HEADERS, timeout=client_timeout)
    )
    watch.add(request, connect.cancel)
    try:
        upstream = await connect
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return _ended_by_watch(request, error_code)
    except (aiohttp.ClientError, TimeoutError) as e:
        watch.discard(request)
        log.debug("worker %s unreachable: %r", worker_name, e)
        return _error_response(error_code), Outcome.FAILED_BEFORE_START

    try:
        if upstream.status != 200:
            log.debug("worker %s answered HTTP %d", worker_name, upstream.status)
            return _error_response(error_code), Outcome.FAILED_BEFORE_START
        watch.add(request, upstream.close)
        return await _pump(request, upstream, worker_name, error_code, watch)
    finally:
        watch.discard(request)
        # Closing (not releasing) drops the connection when the stream did not finish, so
        # the worker sees its client vanish and can stop generating.
        upstream.close()


def _ended_by_watch(
    request: web.BaseRequest, error_code: int
) -> tuple[web.StreamResponse, Outcome]:
    """What to answer when the watch stopped a relay before the worker's first message."""
    if client_gone(request):
        return web.Response(), Outcome.CLIENT_GONE
    return _error_response(error_code), Outcome.ABORTED


async def _pump(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    worker_name: str,
    error_code: int,
    watch: DisconnectWatch,
) -> tuple[web.StreamResponse, Outcome]:
    # The client's response starts with the worker's first whole message, so a worker that
    # fails before it can still be answered with a plain in-band error (or retried).
    response: web.StreamResponse | None = None
    content = upstream.content
    pending = b""
    failure: BaseException | None = None
    while True:
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as e:
            # aiohttp raises one shared "Connection closed" instance for every response
            # closed under a reader (the watch does that); each raise prepends to its
            # traceback, which would keep every such relay's frames alive for good.
            e.__traceback__ = None
            if client_gone(request):
                return response or web.Response(), Outcome.CLIENT_GONE
            if response is None and watch.closing:
                return _ended_by_watch(request, error_code)
            failure = e
            break
        if not chunk:
            break
        if not pending and chunk[-1] == 0:
            out = chunk
        else:
            cut = chunk.rfind(b"\0") + 1
            if cut == 0:
                pending += chunk
                if len(pending) > MAX_MESSAGE_SIZE:
                    failure = ValueError("worker sent a message larger than 16 MiB")
                    break
                continue
            out, pending = pending + chunk[:cut], chunk[cut:]
        try:
            if response is None:
                response = web.StreamResponse()
                await response.prepare(request)
            await response.write(out)
        except ConnectionResetError:
            return response or web.Response(), Outcome.CLIENT_GONE

    if failure is not None:
        log.debug("stream from %s failed: %r", worker_name, failure)
        if response is None:
            return _error_response(error_code), Outcome.FAILED_BEFORE_START
        tail = protocol.stream_error(error_code)
        outcome = Outcome.ABORTED if watch.closing else Outcome.FAILED_MIDSTREAM
    else:
        # A last message without its NUL still counts as a message (FastChat relays it).
        tail = pending + b"\0" if pending else b""
        outcome = Outcome.COMPLETED
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
