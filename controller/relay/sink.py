"""Writing a relayed stream straight to the client's transport: the one place that reaches
below aiohttp's public API.

Why: relaying a token through ``StreamResponse.write`` wakes the handler task per token;
writing from the worker connection's read callback to the client's transport does not, and
that halves the controller's CPU per relayed token (docs/performance.md). Doing so needs
three things aiohttp does not offer publicly, all used here and nowhere else:

* the client's transport (``request.transport``, public, but writing to it bypasses the
  response's writer);
* whether aiohttp paused writing to a slow client (``request.protocol.writing_paused``,
  set by its ``RequestHandler``'s ``pause_writing``), so the relay can stop reading from
  the worker instead of buffering;
* the writer's byte count (``AbstractStreamWriter.output_size``), which the access log reads
  as ``response.body_length`` once the response ends: bytes written past the writer are
  added to it, so the log counts every byte sent.

setup.cfg bounds aiohttp below its next major version for these.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .tally import RelayTally

__all__ = ["GONE", "OK", "SLOW", "ClientSink"]


#: what :meth:`ClientSink.write` says
OK, SLOW, GONE = 0, 1, 2


class ClientSink:
    """The client's side of one relayed stream, once its response has started."""

    __slots__ = ("_protocol", "_tally", "_transport", "chunked", "written")

    def __init__(
        self, transport: asyncio.BaseTransport, protocol: Any, chunked: bool, tally: RelayTally
    ) -> None:
        self._transport: Any = transport
        self._protocol = protocol
        self._tally = tally
        #: the response is chunked: each write must be one chunk
        self.chunked = chunked
        #: bytes written here, past the response's writer
        self.written = 0

    @classmethod
    def of(
        cls, request: web.Request, response: web.StreamResponse, tally: RelayTally
    ) -> ClientSink | None:
        """The sink for ``request``'s started ``response``, counting the messages written
        in ``tally``; ``None`` if the client left."""
        transport = request.transport
        if transport is None or transport.is_closing():
            return None
        return cls(transport, request.protocol, response.chunked, tally)

    def write(self, framed: bytes) -> int:
        """Write bytes already framed as the response is: whole messages, each ending with
        the only NUL it holds (chunk framing has none), which is how they are counted.

        Returns ``GONE`` (nothing written: the client left), ``SLOW`` (written, and the
        client is not reading fast enough) or ``OK``. One call per relayed message: this is
        the hottest path of a stream.
        """
        transport = self._transport
        if transport.is_closing():
            return GONE
        transport.write(framed)
        self.written += len(framed)
        self._tally.chunks += framed.count(0)
        return SLOW if self._protocol.writing_paused else OK

    def account(self, writer: AbstractStreamWriter) -> None:
        """Add the bytes written here to the response's count (before ``write_eof``)."""
        writer.output_size += self.written
        self.written = 0
