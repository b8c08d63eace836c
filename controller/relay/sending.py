"""A relayed request's body sent to the worker a piece per turn of the loop, no faster than
the worker's connection takes it.

A mixin of :class:`~controller.relay.upstream.Upstream`, kept apart so that each module
holds one job. A small request goes in one write, its head and body together. A body larger
than :data:`PIECE` goes after the head, :data:`PIECE` bytes per turn of the loop, and none
while the transport says its buffer is full (``pause_writing`` until ``resume_writing``):
one write of a 63 MiB body held the loop 68 ms (copying it behind its head, then handing it
to the socket), and the transport then held the body a second time for as long as the
worker took to read it. The pieces are views of the body, never copies of it.
"""

from __future__ import annotations

import asyncio

__all__ = ["PIECE", "Body", "Sending"]

#: a request's body: bytes, or the bytearray a large one was gathered in as it arrived
Body = bytes | bytearray
#: a body larger than this goes to the worker in pieces of this size, one per turn
PIECE = 256 * 1024


class Sending:
    """How :class:`~controller.relay.upstream.Upstream` writes a request."""

    # Set by Upstream.
    transport: asyncio.Transport | None
    ended: bool
    _loop: asyncio.AbstractEventLoop
    #: the body still to write after the head (``None`` once all of it is written)
    _unsent: memoryview | None = None
    #: the transport's buffer is full (kept across requests, as the connection is)
    _writing_paused: bool = False
    #: the write of the next piece, when one is due
    _next_piece: asyncio.Handle | None = None

    def _first_write(self, head: bytes, body: Body) -> bytes:
        """What to write first: the head and a small body in one, or a large body's head
        alone (its body then follows from :meth:`_send_rest`)."""
        if len(body) <= PIECE:
            return head + body
        self._unsent = memoryview(body)
        return head

    @property
    def sent(self) -> bool:
        """The whole request has gone to the transport."""
        return self._unsent is None

    def _send_rest(self) -> None:
        """Write the rest of the body, a piece per turn, after the head was written."""
        if self._unsent is not None and self._next_piece is None and not self._writing_paused:
            self._next_piece = self._loop.call_soon(self._write_piece)

    def _stop_sending(self) -> None:
        self._unsent = None
        if self._next_piece is not None:
            self._next_piece.cancel()
            self._next_piece = None

    def _write_piece(self) -> None:
        self._next_piece = None
        rest, transport = self._unsent, self.transport
        if rest is None or self._writing_paused:
            return
        if self.ended or transport is None or transport.is_closing():
            # The answer ended (or the connection did) first: the rest is not wanted, and
            # the connection, its request cut short, is never reused (see ``sent``).
            self._stop_sending()
            return
        transport.write(rest[:PIECE])
        rest = rest[PIECE:]
        self._unsent = rest if rest else None
        self._send_rest()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._send_rest()
