"""Client reads handed to aiohttp a slice per turn of the event loop, fairly between source
addresses.

When a thousand requests arrive at once (a thousand clients calling ``/worker_get_status``
together), uvloop hands every read to aiohttp in one turn of the loop, aiohttp parses them
all and makes a thousand tasks, which all run in the next turn: other clients' requests
wait behind every one of them. :class:`FairReads` lets ``per_turn`` reads through in one
turn, and while more than one source address holds connections, :data:`SOURCE_SHARE` of
any one address; past that, a connection's read waits (its socket no longer read
meanwhile) in a queue of its source address, and the queues are served in rotation, one
read each, in the next turns, at most :data:`BURST_PER_TURN` a turn (each read is a
request's work in the turn after, a registration's 0.3 ms, a status call's 0.1 ms, which
everyone else's waits behind): half as many after a turn that took longer than 1 ms, one
more after one that did not (:class:`~controller.pacing.Allowance`), so that costly
requests go fewer a turn than cheap ones. Meanwhile a read from an address with none
waiting is handed on at once (up to :data:`QUIET_PER_TURN` such reads a turn), however
many reads other addresses have waiting: a client that is not part of a burst does not
queue behind it. A large read counts as several (one more per :data:`UNIT`
it holds), so a turn copies and parses a bounded amount of a large body, however many
connections are sending one. A read larger than :data:`BULK` always waits and is handed
on in slices of at most that, a connection's slice a turn (uvloop reads up to 512,000 bytes
at a time, and aiohttp copies each into new memory: 1.5-3 ms a read in the hostile
benchmark's oversized bodies), its socket not read again until the last slice; the reads
of a connection whose body was refused (dropped, not parsed) go whole, and such
connections' sockets are read one at a time, one read every :data:`DRAIN_GAP` in all.

The count of a turn's reads is reset in the turn after it reaches :data:`RESET_AFTER`, not
after every turn: steady traffic then schedules one callback per ``RESET_AFTER`` reads
rather than one per read, and a turn lets through at most ``per_turn`` reads and at least
``per_turn - RESET_AFTER`` (what earlier turns left on the count).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sized
from typing import Protocol

from ..pacing import Allowance, Lines

__all__ = [
    "BULK",
    "BURST_PER_TURN",
    "DRAIN_GAP",
    "HELD_MOST",
    "QUIET_PER_TURN",
    "RESET_AFTER",
    "SOURCE_SHARE",
    "UNIT",
    "FairReads",
    "Reader",
]

#: reads counted before the count is reset in the next turn
RESET_AFTER = 8
#: held reads handed on in one turn (24 a turn made turns of 3 ms in the hostile
#: benchmark's connect burst: 256 clients' stream requests)
BURST_PER_TURN = 8
#: reads from sources with none waiting handed on in one turn while others wait
QUIET_PER_TURN = 16
#: a read counts once for each of these (a power of two) it holds, plus one: a turn that
#: hands on 24 reads of a large body's 256 KiB each would copy and parse 6 MiB
UNIT = 16 << 10
_UNIT_BITS = UNIT.bit_length() - 1
#: bytes of one connection's held reads handed on in one turn (a larger read goes in
#: slices), unless more are needed to keep within HELD_MOST
BULK = 64 << 10
#: reads of one source address handed on at once between two resets of the count, while
#: other addresses hold connections too: past it, its reads wait their turn in rotation
#: (sixteen connections registering workers as fast as they could made every turn 2-5 ms
#: of registrations, which each other client's request waited out); two, so that a client
#: with two requests in one turn is not held for the second
SOURCE_SHARE = 2
#: seconds between two reads of refused bodies (dropped as they come), whichever
#: connections they come from, so that what a client sends after its 413 costs the
#: controller a bounded rate of reads: thirteen bodies of 100 MiB refused at once were
#: drained as fast as they came (850 MB in 1.7 s). At 256 KiB a read, at most 256 MB/s:
#: 2.5 GB within aiohttp's 10 s of lingering
DRAIN_GAP = 0.001
#: bytes a connection's held reads may come to after its turn, at most: aiohttp resumes a
#: socket itself when its own buffer drains, so another read can come while some are held
HELD_MOST = 1 << 20


class Reader(Protocol):
    """A client connection as :class:`FairReads` sees it."""

    source: str
    #: reads held back, oldest first (``None`` when none are); the first may be the rest
    #: of a read handed on in part
    held: list[bytes | memoryview] | None
    #: this object stopped the transport's reading while reads are held
    held_paused: bool
    #: its body was refused: what it sends is dropped, so held reads go whole
    discarding: bool
    transport: asyncio.Transport | None

    def deliver(self, data: bytes) -> None:
        """Hand ``data`` to aiohttp's protocol."""


class FairReads:
    """At most ``per_turn`` client reads handed on in one turn of ``loop``; the others in
    later turns, a source address at a time in rotation. ``held_back`` counts the reads
    that had to wait (for tests and the curious)."""

    __slots__ = (
        "_allowance",
        "_by_source",
        "_drain_timer",
        "_draining",
        "_handed",
        "_loop",
        "_passed",
        "_queues",
        "_quiet",
        "_scheduled",
        "_sources",
        "held_back",
        "per_turn",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        per_turn: int,
        sources: Sized = (),
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._loop = loop
        #: held reads handed on a turn
        self._allowance = Allowance(BURST_PER_TURN, clock)
        self.per_turn = max(1, per_turn)
        #: the source addresses holding connections (its size is all that is read): with
        #: more than one, a source's reads are counted against SOURCE_SHARE
        self._sources = sources
        #: reads handed on since the count was last reset, per source (counted only while
        #: more than one source holds connections)
        self._by_source: dict[str, int] = {}
        #: reads handed on since the count was last reset (see RESET_AFTER)
        self._passed = 0
        #: reads handed on this turn, past the count, from sources with none waiting
        self._quiet = 0
        self._scheduled = False
        #: connections with reads held, per source address, in the order they are served
        self._queues: Lines[Reader] = Lines()
        #: connections handed on in part in the last turn (see _pause_again)
        self._handed: list[Reader] = []
        #: refused bodies' connections waiting to be read again, in turn (see dropped)
        self._draining: dict[Reader, None] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        self.held_back = 0

    def received(self, reader: Reader, data: bytes) -> bool:
        """A read from ``reader``'s socket: ``True`` when the caller is to hand it on now,
        else held for a later turn (``False``)."""
        if (
            reader.held is None
            and not self._queues
            and self._passed < self.per_turn
            and len(data) <= BULK
            and (len(self._sources) < 2 or self._within_share(reader.source))
        ):
            self._passed += 1 + (len(data) >> _UNIT_BITS)
            if self._passed >= RESET_AFTER and not self._scheduled:
                self._schedule()
            return True
        # Another source's burst is waiting: a source with nothing waiting goes first (up
        # to QUIET_PER_TURN reads a turn), so that its request does not queue behind it.
        queues = self._queues
        quiet = queues and reader.held is None and reader.source not in queues
        if quiet and self._quiet < QUIET_PER_TURN and len(data) <= BULK:
            self._quiet += 1 + (len(data) >> _UNIT_BITS)
            return True
        self.held_back += 1
        if reader.held is None:
            reader.held = [data]
            self._queues.add(reader.source, reader)
        else:
            reader.held.append(data)
        self._pause_held(reader)
        if not self._scheduled:
            self._schedule()
        return False

    def dropped(self, reader: Reader) -> None:
        """A read of ``reader``'s refused body came and was dropped: its socket is read
        again in turn with the other refused bodies', one read every DRAIN_GAP in all."""
        transport = reader.transport
        if transport is not None and transport.is_reading():
            transport.pause_reading()
        self._draining[reader] = None
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(DRAIN_GAP, self._drain_next)

    def _drain_next(self) -> None:
        self._drain_timer = None
        draining = self._draining
        while draining:
            reader = next(iter(draining))
            del draining[reader]
            transport = reader.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
                break
        if draining:
            self._drain_timer = self._loop.call_later(DRAIN_GAP, self._drain_next)

    def flush(self, reader: Reader, *, deliver: bool = True) -> None:
        """Hand on ``reader``'s held reads now (its client sent its last byte: they go
        before the end), or drop them (``deliver=False``: the connection is lost)."""
        self._draining.pop(reader, None)
        if reader.held is not None:
            self._queues.remove(reader.source, reader)
            if deliver:
                self._hand_on(reader)
            else:
                reader.held = None

    def _within_share(self, source: str) -> bool:
        """Count a read of ``source`` if it is within its share of the count
        (:data:`SOURCE_SHARE`); ``False`` (not counted) when it is past it."""
        counts = self._by_source
        if not counts and not self._scheduled:
            self._schedule()  # the shares start over in the next turn
        passed = counts.get(source, 0)
        if passed >= SOURCE_SHARE:
            return False
        counts[source] = passed + 1
        return True

    def _schedule(self) -> None:
        self._scheduled = True
        self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._passed = self._quiet = 0
        if self._by_source:
            self._by_source.clear()
        queues = self._queues
        if self._handed:
            self._pause_again()
        if not queues:
            return
        burst = self._allowance.next_turn()
        again: list[Reader] = []  # handed on in part: the rest waits for a later turn
        while queues and self._passed < burst:
            reader = queues.take()
            self._passed += 1 + (self._hand_on(reader, in_slices=True) >> _UNIT_BITS)
            if reader.held:
                again.append(reader)
        for reader in again:
            queues.add(reader.source, reader)
        self._handed = again
        if queues or self._passed >= RESET_AFTER:
            self._schedule()

    def _pause_again(self) -> None:
        """Stop reading the sockets of the connections handed on in part in the last turn,
        which aiohttp read again meanwhile: its body reader resumes the socket whenever it
        drains aiohttp's buffer, and a slice handed on woke it. This runs after that
        reader's step (the slice scheduled it first) and before the loop polls again, so a
        held connection gets one slice a turn, not a socket read as well (256 KiB a turn
        each in the hostile benchmark's oversized bodies, until HELD_MOST)."""
        handed, self._handed = self._handed, []
        for reader in handed:
            if reader.held:
                self._pause_held(reader)

    @staticmethod
    def _pause_held(reader: Reader) -> None:
        """Stop reading ``reader``'s socket while it has reads held, if it is being read
        (``held_paused``: resumed when the last held read is handed on)."""
        transport = reader.transport
        if transport is not None and transport.is_reading():
            transport.pause_reading()
            reader.held_paused = True

    @staticmethod
    def _hand_on(reader: Reader, *, in_slices: bool = False) -> int:
        """Hand on ``reader``'s held reads: all of them, or ``in_slices``, :data:`BULK`
        bytes (more when over :data:`HELD_MOST` are held; all of a refused body's, which
        are dropped, not parsed), a read cut where the slice ends and the rest kept first
        in line. Returns how many bytes went. Its socket is read again once none is held."""
        held = reader.held or []
        total = sum(map(len, held))
        room = max(BULK, total - HELD_MOST) if in_slices and not reader.discarding else total
        if total <= room:
            pieces, reader.held = held, None
        else:
            pieces, left = [], room
            while left:
                first = held[0]
                if len(first) <= left:
                    pieces.append(held.pop(0))
                    left -= len(first)
                else:
                    view = memoryview(first)
                    pieces.append(view[:left])
                    held[0] = view[left:]
                    left = 0
        if reader.held is None and reader.held_paused:
            # Reading resumes before aiohttp sees the data, so that a pause it asks for
            # now (its buffer full) stands.
            reader.held_paused = False
            transport = reader.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        given = 0
        for piece in pieces:  # one by one: joined, they would be copied once more
            given += len(piece)
            reader.deliver(piece if type(piece) is bytes else bytes(piece))
        return given
