"""The bytes a relay holds while they wait: a stream's messages, a single document.

A mixin of :class:`~controller.relay.upstream.Upstream`, kept apart so that each module
holds one job: here, splitting a stream's body into whole NUL-terminated messages (staged
for the relay, or written to the client), collecting a single document up to its limit, and
counting both in the shared :class:`~controller.relay.budget.Budget`.
"""

from __future__ import annotations

import asyncio

from ..joining import Chunks
from .budget import Budget
from .framing import ResponseFraming, UpstreamError
from .sink import GONE, ClientSink

__all__ = ["BULK_READ", "MAX_MESSAGE_SIZE", "Holding"]

#: a worker that sends this much without a single NUL is not speaking the protocol
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: a read at least this large means the worker is sending in bulk: the connection reads
#: no more until the loop's next turn (see :meth:`Holding._yield_turn`)
BULK_READ = 64 * 1024


class Holding:
    """What :class:`~controller.relay.upstream.Upstream` does with the body it decodes."""

    # Set by Upstream (see Upstream._reset).
    transport: asyncio.Transport | None
    pending: bytearray
    document: Chunks | None
    refused: str | None
    ended: bool
    draining: bool
    _framing: ResponseFraming
    _budget: Budget
    _staged: list[bytes]
    _held: int
    _parked: bool
    _sink: ClientSink | None
    _document_limit: int
    _reserved: bool
    _loop: asyncio.AbstractEventLoop
    #: reading stopped until the loop's next turn (kept across requests, unlike the rest)
    _yielding: bool = False

    def _fail(self, error: BaseException) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _client_gone(self) -> None:
        raise NotImplementedError

    def _collect(self, pieces: list[bytes]) -> None:
        """Add a single document's body bytes, reserving them in the budget first. They are
        kept as they came (:class:`~controller.joining.Chunks`): most answers this large are
        refused past their limit, and are then never copied."""
        document = self.document
        assert document is not None
        length = self._framing.length
        if not self._reserved and length >= 0:
            self._reserved = True
            self._reserve(length)
        for piece in pieces:
            if self.ended:
                return
            if not self._reserved:
                self._reserve(len(piece))
            document.add(piece)
        if document.size > self._document_limit and not self.ended:
            self._refuse("worker's answer is larger than max_worker_answer_size")

    def _reserve(self, size: int) -> None:
        if (self.document.size if self.document else 0) + size > self._document_limit:
            self._refuse("worker's answer is larger than max_worker_answer_size")
        elif self._budget.reserve(size):
            self._held += size
        else:
            self._refuse("the relays' buffers are full (max_buffered_bytes)")

    def _refuse(self, reason: str) -> None:
        if not self.ended:
            self.refused = reason
            self._framing.spoil()
            self._end()

    def _body(self, data: bytes) -> None:
        """Split a stream's body bytes into whole messages and hand those on."""
        pending = self.pending
        if not pending and data[-1] == 0:
            self._message(data)
            return
        cut = data.rfind(b"\0") + 1
        if not cut:
            pending += data
            self._hold(len(data))
            if len(pending) > MAX_MESSAGE_SIZE:
                self._fail(UpstreamError("worker sent a message larger than 16 MiB"))
            return
        if pending:
            pending += data[:cut]
            out = bytes(pending)
            self._give_back(len(pending) - cut)
            pending.clear()
        else:
            out = data[:cut]
        if cut < len(data):
            pending += data[cut:]
            self._hold(len(data) - cut)
        self._message(out)

    def _message(self, data: bytes) -> None:
        if self._sink is None:
            self._staged.append(data)
            self._hold(len(data))
            self._wake()
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Write whole messages to the client, framed as its response is."""
        assert self._sink is not None
        if self._sink.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._to_client(data)

    def _to_client(self, framed: bytes) -> None:
        sink = self._sink
        assert sink is not None
        said = sink.write(framed)
        if said:
            if said == GONE:
                self._client_gone()
            else:
                self._pause()

    def _pause(self) -> None:
        if not self.draining and self.transport is not None:
            self.draining = True
            self.transport.pause_reading()
            self._wake()

    def _yield_turn(self) -> None:
        """Read nothing more until a later turn of the loop: uvloop reads a readable socket
        up to 32 times in a row (256 KiB each) before it looks at anything else, so a
        worker sending in bulk (a huge answer) would hold the loop for every other client.
        Reading resumes in the next turn, or later when other connections read in bulk
        too: one of them a turn (the budget's ``bulk_reads``)."""
        transport = self.transport
        if not self._yielding and transport is not None:
            self._yielding = True
            transport.pause_reading()
            self._loop.call_soon(self._budget.bulk_reads.call, self._read_on)

    def _read_on(self) -> None:
        self._yielding = False
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and not self.draining
            and not self._parked
        ):
            transport.resume_reading()

    def _hold(self, size: int) -> None:
        """Count bytes this stream holds; over the budget, stop reading until it frees."""
        self._held += size
        budget = self._budget
        budget.take(size)
        if budget.over and not self._parked and budget.park(self._budget_freed, self._held):
            self._parked = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _give_back(self, size: int) -> None:
        if size:
            self._held -= size
            self._budget.give_back(size)

    def _budget_freed(self) -> None:
        self._parked = False
        if self.transport is not None and not self.ended and not self.draining:
            self.transport.resume_reading()
