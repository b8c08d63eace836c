"""The streaming relay between a client and the worker chosen for it.

A relay forwards whole NUL-terminated messages as soon as they arrive and never buffers a
response to its end. Before anything has reached the client, a failure becomes a single
in-band error message; after, the client gets the messages already relayed followed by the
error message, so every client sees a well-formed stream. The worker side of a stream is
:class:`~controller.relay.upstream.Upstream`.
"""

from __future__ import annotations

import enum
import logging

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .. import protocol
from ..requestid import HEADER, REQUEST_ID
from .reach import Reach
from .sink import ClientSink
from .tally import RelayTally, StreamTiming
from .upstream import Upstream
from .watch import client_gone

__all__ = ["Outcome", "relay_stream"]

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a relayed request ended."""

    COMPLETED = "completed"
    #: the worker could not be reached or failed before its first message
    FAILED_BEFORE_START = "failed_before_start"
    #: the controller refused the answer for its own limits (too large, buffers full);
    #: says nothing about the worker's health, and another worker would fare no better
    REFUSED = "refused"
    #: the worker failed or went silent after messages had been relayed
    FAILED_MIDSTREAM = "failed_midstream"
    CLIENT_GONE = "client_gone"
    #: the controller ended it (shutting down); says nothing about the worker
    ABORTED = "aborted"


async def relay_stream(
    request: web.Request,
    worker_name: str,
    body: bytes | bytearray,
    reach: Reach,
    error_code: int,
    timing: StreamTiming | None = None,
) -> tuple[web.StreamResponse, Outcome]:
    """Relay ``POST {worker}/worker_generate_stream`` to the client; never raises for I/O.

    Returns the response (already written) and how the stream ended. The messages relayed
    are counted in ``reach.tally``, and ``timing`` learns when the first one went out.
    """
    target = reach.pool.target(worker_name, "/worker_generate_stream")
    if target is None:
        log.debug("worker %s has no usable http(s) address", worker_name)
        return _error_response(error_code), Outcome.FAILED_BEFORE_START
    fresh = False
    while True:
        upstream = await reach.send(target, body, request, fresh=fresh)
        try:
            relayed = await _pump(request, upstream, worker_name, error_code, reach, timing)
        finally:
            reach.release(upstream, request)
        if relayed is not None:
            return relayed
        # A kept-alive connection the worker had closed: once more on a new one.
        fresh = True


async def _pump(
    request: web.Request,
    upstream: Upstream,
    worker_name: str,
    error_code: int,
    reach: Reach,
    timing: StreamTiming | None,
) -> tuple[web.StreamResponse, Outcome] | None:
    """Run one relay to its end; ``None`` if it should be tried again on a new connection."""
    # The client's response starts with the worker's first whole message, so a worker that
    # fails before it can still be answered with a plain in-band error (or retried). From
    # then on the upstream protocol writes each message to the client itself; this task
    # wakes only when the client must be waited for, and at the end.
    response: web.StreamResponse | None = None
    writer: AbstractStreamWriter | None = None
    sink: ClientSink | None = None
    tally = reach.tally
    while True:
        await upstream.wait()
        try:
            if upstream.has_staged and response is None:
                response = web.StreamResponse()
                request_id = REQUEST_ID.get()
                if request_id is not None:
                    # Prepared here, so the edge cannot add it to the answer afterwards.
                    response.headers[HEADER] = request_id
                if request.version >= aiohttp.HttpVersion11:
                    # Chunked framing, which the upstream then writes for each message.
                    response.enable_chunked_encoding()
                writer = await response.prepare(request)
                tally.started(request, response.status)
                # Headers and the first messages leave in one write.
                staged = upstream.take_staged()
                while staged:
                    await response.write(staged)
                    tally.chunks += staged.count(0)
                    if timing is not None:
                        timing.first()
                    staged = upstream.take_staged()
                sink = ClientSink.of(request, response, tally)
                if sink is None:
                    raise ConnectionResetError("client gone")
                upstream.attach(sink)
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
    elif upstream.refused is not None and response is None:
        # The controller's own limit (no connection to a worker came free): an in-band error
        # as for a failed worker, without counting against the worker's health.
        log.debug("stream to %s refused: %s", worker_name, upstream.refused)
        return _error_response(error_code), Outcome.REFUSED
    elif upstream.failure is not None:
        log.debug("stream from %s failed: %r", worker_name, upstream.failure)
        if response is None:
            return _error_response(error_code), Outcome.FAILED_BEFORE_START
        tail, outcome = protocol.stream_error(error_code), Outcome.FAILED_MIDSTREAM
    else:
        # A last message without its NUL still counts as a message (FastChat relays it).
        pending = upstream.pending
        tail, outcome = (bytes(pending) + b"\0" if pending else b""), Outcome.COMPLETED
    # The worker's own last message, not the controller's in-band error.
    relayed = outcome is Outcome.COMPLETED and bool(tail)
    if response is None:
        if relayed:
            _relayed_last(tally, timing)
        return web.Response(body=tail), outcome
    try:
        if sink is not None and writer is not None:
            sink.account(writer)  # for the access log's byte count
        if tail:
            await response.write(tail)
            if relayed:
                _relayed_last(tally, timing)
        await response.write_eof()
    except ConnectionResetError:
        return response, Outcome.CLIENT_GONE
    return response, outcome


def _relayed_last(tally: RelayTally, timing: StreamTiming | None) -> None:
    tally.chunks += 1
    if timing is not None:
        timing.first()


def _error_response(error_code: int) -> web.Response:
    return web.Response(body=protocol.stream_error(error_code))
