"""How FairReads shares a turn of the loop between source addresses when several send at
once, how many held reads it hands on a turn as turns grow long or short, and how a pacer
with an allowance, or handing on a shared round's outcome, spaces its work over turns."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable

from controller.edge.fair_reads import BULK, BURST_PER_TURN, DRAIN_GAP, SOURCE_SHARE, FairReads
from controller.pacing import TURN_BUDGET, Allowance, Pacer

from .test_hostile_pacing import _frozen_clock, _Reader, _StepLoop


def offer(reads: FairReads, reader: _Reader, data: bytes) -> bool:
    """A read arrives, as a connection hands it on: at once if told so."""
    if reads.received(reader, data):
        reader.deliver(data)
        return True
    return False


def test_while_two_addresses_hold_connections_each_gets_its_share_of_a_turn() -> None:
    """Sixteen connections of one address send a read each in one turn (a client
    registering workers as fast as it can). While it is the only address holding
    connections, all sixteen go on at once (the dispatch benchmark's clients are never
    held). Once another address holds connections too, SOURCE_SHARE of them go on at once
    and the rest in later turns, while the other address's read goes on at once, and so
    does its next in the next turn."""
    loop = _StepLoop()
    sources = {"10.0.0.1": 16}
    reads = FairReads(loop, 24, sources, clock=_frozen_clock)  # type: ignore[arg-type]
    alone = [_Reader("10.0.0.1") for _ in range(16)]
    assert all(offer(reads, r, b"a") for r in alone)
    loop.end_turn()
    assert reads.held_back == 0

    sources["10.0.0.2"] = 1
    flood = [_Reader("10.0.0.1") for _ in range(16)]
    went = [r for r in flood if offer(reads, r, b"f")]
    assert len(went) == SOURCE_SHARE
    other = _Reader("10.0.0.2")
    assert offer(reads, other, b"o")
    turns = 0
    while any(r.held for r in flood):
        loop.end_turn()
        turns += 1
        if turns == 1:
            assert offer(reads, other, b"p")  # the flood still waits; this does not
    assert all(r.delivered == [b"f"] for r in flood)
    assert other.delivered == [b"o", b"p"]
    assert turns >= (16 - SOURCE_SHARE) // BURST_PER_TURN


def test_held_reads_a_turn_halve_after_a_long_turn_and_grow_back_after_short_ones() -> None:
    """200 reads wait. The first turn hands on BURST_PER_TURN of them; after each turn
    longer than TURN_BUDGET the next hands on half as many, down to one; after each
    shorter one, one more, up to BURST_PER_TURN again. A gap of seconds (the loop was
    idle) is not taken for a turn's length: the count starts afresh. Every read goes on
    once, in order."""
    loop = _StepLoop()
    now = [0.0]
    reads = FairReads(loop, 1, clock=lambda: now[0])  # type: ignore[arg-type]
    burst = [_Reader("10.0.0.1") for _ in range(200)]
    for i, reader in enumerate(burst):
        offer(reads, reader, b"%d" % i)

    def turn(length: float) -> int:
        before = sum(len(r.delivered) for r in burst)
        now[0] += length
        loop.end_turn()
        return sum(len(r.delivered) for r in burst) - before

    assert turn(TURN_BUDGET / 4) == BURST_PER_TURN
    long = [turn(TURN_BUDGET * 3) for _ in range(5)]
    assert long == [BURST_PER_TURN // 2, BURST_PER_TURN // 4, BURST_PER_TURN // 8, 1, 1]
    short = [turn(TURN_BUDGET / 4) for _ in range(BURST_PER_TURN + 1)]
    assert short == [*range(2, BURST_PER_TURN + 1), BURST_PER_TURN, BURST_PER_TURN]
    assert turn(TURN_BUDGET * 3) == BURST_PER_TURN // 2
    assert turn(5.0) == BURST_PER_TURN  # a pause, not a long turn: it starts afresh
    while any(r.held for r in burst):
        turn(TURN_BUDGET / 4)
    assert [r.delivered for r in burst] == [[b"%d" % i] for i in range(200)]


class _OwnTransport(_Reader):
    """A connection from 10.0.0.3 that is its own transport: its socket is read while
    ``reading``, and it is closing once ``closing``."""

    def __init__(self) -> None:
        super().__init__("10.0.0.3")
        self.transport = self  # type: ignore[assignment]
        self.reading = True
        self.closing = False

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class _Uploader(_OwnTransport):
    """A connection sending a large body, and aiohttp's side of it: whatever is handed on
    wakes its body reader in the next turn, and the reader's step resumes the socket (as
    aiohttp 3.14 does whenever it drains its buffer, paused or not)."""

    def __init__(self, loop: _StepLoop, body: bytes) -> None:
        super().__init__()
        self.loop = loop
        self.unsent = [body[i : i + 256_000] for i in range(0, len(body), 256_000)]
        self.socket_reads = 0

    def deliver(self, data: bytes) -> None:
        super().deliver(data)
        self.loop.call_soon(self.resume_reading)  # the body reader's step

    def poll(self, reads: FairReads) -> None:
        """The loop polls: a read of up to 256,000 bytes if the socket is being read."""
        if self.reading and self.unsent:
            self.socket_reads += 1
            offer(reads, self, self.unsent.pop(0))


def test_a_held_body_gets_a_slice_a_turn_though_aiohttp_resumes_its_socket() -> None:
    """Three connections send bodies of 5 MB in reads of 256,000 bytes (uvloop's), and
    aiohttp's body reader resumes each socket whenever it takes what was handed on. Each
    still gets at most BULK bytes a turn, its socket read again only once what it holds is
    handed on, and its bytes arrive whole and in order. Before, the socket was read every
    turn while a slice went on: a connection held more each turn until HELD_MOST (1 MiB),
    and from then on was handed a whole socket read a turn (256 KiB), copied and parsed."""
    loop = _StepLoop()
    reads = FairReads(loop, 24, clock=_frozen_clock)  # type: ignore[arg-type]
    bodies = [bytes([65 + i]) * 5_000_000 for i in range(3)]
    senders = [_Uploader(loop, body) for body in bodies]
    turns = 0
    while any(s.unsent or s.held for s in senders):
        before = [sum(map(len, s.delivered)) for s in senders]
        loop.end_turn()
        handed = [sum(map(len, s.delivered)) - b for s, b in zip(senders, before, strict=True)]
        assert max(handed) <= BULK, f"turn {turns}: {handed}"
        for sender in senders:
            sender.poll(reads)
        turns += 1
        assert turns < 3 * 5_000_000 // BULK + 100
    assert [b"".join(s.delivered) for s in senders] == bodies
    # a read each time what it held had gone on: 256,000 bytes a read, BULK a turn
    assert all(s.socket_reads == len(range(0, 5_000_000, 256_000)) for s in senders)


class _Refused(_OwnTransport):
    """A connection whose body was refused (413) and which keeps sending."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.discarding = True


class _TimerLoop(_StepLoop):
    """A _StepLoop whose timers fire when the test says (``fire``), with their delays."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timers.append((delay, callback))
        return object()

    def fire(self) -> float:
        (delay, callback), *self.timers = self.timers
        callback()
        return delay


def test_refused_bodies_are_read_one_read_every_drain_gap_in_turn() -> None:
    """Three connections whose bodies were refused keep sending (thirteen 100 MiB bodies
    at once, in the hostile benchmark). Each read is dropped and its socket no longer
    read; then one socket is read again every DRAIN_GAP, in turn, skipping a connection
    that closed meanwhile. Before, each was read again in the next turn: three reads a
    turn, drained as fast as the kernel delivered them."""
    loop = _TimerLoop()
    reads = FairReads(loop, 24, clock=_frozen_clock)  # type: ignore[arg-type]
    senders = [_Refused(name) for name in "abc"]

    def poll() -> list[str]:
        came = [s.name for s in senders if s.reading and not s.closing]
        for sender in senders:
            if sender.reading and not sender.closing:
                reads.dropped(sender)
        return came

    assert poll() == ["a", "b", "c"]  # read before the refusal: all at once, once
    assert not any(s.reading for s in senders)
    order: list[str] = []
    for _ in range(6):
        loop.end_turn()
        assert poll() == []  # turns pass: nobody is read until the timer fires
        assert loop.fire() == DRAIN_GAP
        order += poll()
    assert order == ["a", "b", "c", "a", "b", "c"]
    senders[1].closing = True
    for _ in range(4):
        loop.fire()
        order += poll()
    assert order[6:] == ["a", "c", "a", "c"]
    reads.flush(senders[0], deliver=False)  # its connection is lost
    loop.fire()
    assert poll() == ["c"] and loop.timers


async def test_a_pacer_with_an_allowance_lets_fewer_through_while_turns_are_long() -> None:
    """Thirty callers of a pacer of 4 a turn with an allowance (status probes and a
    round's answers are paced so): while each turn of the loop lasts 3 ms, 4 go on in the
    first turn and the next (whose length is the first known), then 2, then 1 a turn; once
    turns last 0.1 ms, one more a turn, up to 4. Every caller goes on, in order."""
    now = [0.0]
    step = [TURN_BUDGET * 3]
    turn = [0]

    async def clock_turns() -> None:
        while True:
            turn[0] += 1
            now[0] += step[0]
            if turn[0] == 8:
                step[0] = TURN_BUDGET / 10
            await asyncio.sleep(0)

    pacer = Pacer(4, Allowance(4, clock=lambda: now[0]))
    went: list[tuple[int, int]] = []

    async def caller(i: int) -> None:
        await pacer.turn()
        went.append((turn[0], i))

    ticking = asyncio.ensure_future(clock_turns())
    try:
        await asyncio.gather(*(caller(i) for i in range(30)))
    finally:
        ticking.cancel()
    assert [i for _, i in went] == list(range(30))
    per_turn = [n for _, n in sorted(Counter(t for t, _ in went).items())]
    assert per_turn[:4] == [4, 4, 2, 1]  # the first turn after sets the first length
    assert max(per_turn[4:]) == 4 and 1 in per_turn[4:]
    assert all(b <= a + 1 for a, b in itertools.pairwise(per_turn[3:]))


async def test_a_pacer_hands_a_shared_outcome_on_a_slice_a_turn_or_an_error_at_once() -> None:
    """Five callers wait for one shared round, one of them gone (cancelled): with a
    pacer of 2 a turn, the round's result reaches 2 of them at once and the rest in the
    next turns, in order, the gone one taking its place without being touched. A round
    that fails reaches every caller at once with its error; a cancelled round cancels
    them all."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(2)
    done: asyncio.Future[str] = loop.create_future()
    callers: list[asyncio.Future[str]] = [loop.create_future() for _ in range(5)]
    callers[1].cancel()
    done.set_result("status")
    pacer.settle(callers, done)
    settled = [sum(c.done() for c in callers)]
    while settled[-1] < 5:
        await asyncio.sleep(0)
        settled.append(sum(c.done() for c in callers))
    assert settled[0] == 2 and settled[-1] == 5 and len(settled) >= 3
    assert [c.result() for c in callers if not c.cancelled()] == ["status"] * 4

    failed: asyncio.Future[str] = loop.create_future()
    failed.set_exception(ValueError("the round failed"))
    waiting: list[asyncio.Future[str]] = [loop.create_future() for _ in range(5)]
    pacer.settle(waiting, failed)
    assert all(isinstance(c.exception(), ValueError) for c in waiting)

    cancelled: asyncio.Future[str] = loop.create_future()
    cancelled.cancel()
    left: list[asyncio.Future[str]] = [loop.create_future() for _ in range(3)]
    pacer.settle(left, cancelled)
    assert all(c.cancelled() for c in left)
