"""A large request body on its way through the controller (issue 16's huge-json row): held
once, and handed to the worker a piece per turn of the loop, no faster than the worker reads
it, byte for byte with the relay's headers.

The writes are counted through the worker connection's transport, and the loop's turns by
a task that does nothing but yield; nothing here is timed. These run on uvloop, the
production loop, whose transports keep a view of what they cannot send yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web_protocol

from controller import ControllerConfig, joining
from controller.relay.upstream import Upstream
from controller.server import Controller

from .conftest import register_body
from .test_hostile_pacing import Turns, on_uvloop

MIB = 1 << 20
STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}
#: a body larger than this goes to the worker a piece at a time (controller.relay.sending)
PIECE = 256 * 1024
#: uvloop's default high-water mark of a transport's write buffer
HIGH_WATER = 64 * 1024
ANSWER = b'{"text": "ok", "error_code": 0}\0'


def large_body(size: int) -> bytes:
    """A generation request of ``size`` bytes, nearly all of it one long prompt."""
    head = b'{"model": "m", "prompt": "'
    return head + b"a" * (size - len(head) - 2) + b'"}'


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    """``body`` as a client sends it in 256 KiB chunks."""
    for at in range(0, len(body), 256 * 1024):
        yield body[at : at + 256 * 1024]


class Worker:
    """A worker on a raw socket: reads each request's head and body (``per_read`` bytes a
    turn of the loop), then answers with one stream message; or, ``early``, answers as
    soon as the head has come and reads on as if the next request followed."""

    def __init__(
        self, *, per_read: int = 64 * 1024, early: bool = False, answer: bytes = ANSWER
    ) -> None:
        self.per_read = per_read
        self.early = early
        self.answer = answer
        self.heads: list[bytes] = []
        self.digests: list[str] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if self.early:
                    self._answer(writer, self.answer)
                    continue  # the rest of this body, as this worker reads it, is a head
                digest = hashlib.sha256()
                while length:
                    data = await reader.read(min(self.per_read, length))
                    digest.update(data)
                    length -= len(data)
                    await asyncio.sleep(0)  # the worker's share of the loop: one read a turn
                self.digests.append(digest.hexdigest())
                self._answer(writer, self.answer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, answer: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
        writer.write(answer)


class CountedTransport:
    """A worker connection's transport, recording each write: the turn it came in, its
    size, and what the transport held unsent right after it."""

    def __init__(self, inner: Any, turns: Turns, writes: list[tuple[int, int, int]]) -> None:
        self._inner = inner
        self._turns = turns
        self._writes = writes

    def write(self, data: Any) -> None:
        self._inner.write(data)
        self._writes.append((self._turns.count, len(data), self._inner.get_write_buffer_size()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def serve(url: str) -> Controller:
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    controller = await Controller.serve(config)
    async with aiohttp.ClientSession() as http:
        body = register_body(url, worker_status=STATUS, check_heart_beat=False)
        async with http.post(f"{controller.url}/register_worker", json=body) as r:
            assert r.status == 200
    return controller


def count_writes(monkeypatch: pytest.MonkeyPatch, turns: Turns) -> list[tuple[int, int, int]]:
    writes: list[tuple[int, int, int]] = []
    made = Upstream.connection_made

    def counted(self: Upstream, transport: Any) -> None:
        made(self, cast(asyncio.BaseTransport, CountedTransport(transport, turns, writes)))

    monkeypatch.setattr(Upstream, "connection_made", counted)
    return writes


Call = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def run_against(worker: Worker, call: Call) -> None:
    """Run ``call`` against a controller (at the URL it is given) in front of ``worker``,
    on uvloop, and close both after."""

    async def scenario() -> None:
        controller = await serve(await worker.start())
        try:
            async with aiohttp.ClientSession() as http:
                await call(http, controller.url)
        finally:
            await controller.aclose()
            assert worker.server is not None
            worker.server.close()

    on_uvloop(scenario)


def traced_peak(worker: Worker, call: Call) -> int:
    """The peak of the controller's allocations (tracemalloc) while ``call`` runs (see
    :func:`run_against`)."""
    peaks: list[int] = []

    async def traced(http: aiohttp.ClientSession, url: str) -> None:
        tracemalloc.start()
        try:
            await call(http, url)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    run_against(worker, traced)
    return peaks[0]


def test_a_large_body_goes_to_the_worker_a_piece_a_turn_as_fast_as_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 32 MiB generation request to a worker that reads 64 KiB a turn: the worker gets
    the body byte for byte after the relay's head (X-Request-Id, Via), the controller
    writes it in pieces of at most PIECE bytes, at most one a turn of the loop, and holds
    no more than a piece past the transport's high-water mark unsent at any time (one
    write of the whole request held the loop 68 ms, and the transport held all of it
    until the worker had read it)."""
    turns = Turns()
    writes = count_writes(monkeypatch, turns)
    worker = Worker()
    body = large_body(32 * MIB)
    answers: list[tuple[int, bytes]] = []

    async def relay(http: aiohttp.ClientSession, url: str) -> None:
        with turns:
            url, sent = f"{url}/worker_generate_stream", {"X-Request-Id": "big-1"}
            async with http.post(url, data=chunks(body), headers=sent) as r:
                answers.append((r.status, await r.read()))

    run_against(worker, relay)
    assert answers == [(200, ANSWER)]
    assert worker.digests == [hashlib.sha256(body).hexdigest()]
    [head] = worker.heads
    assert b"\r\nX-Request-Id: big-1\r\n" in head
    assert b"\r\nVia: " in head
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head
    first, *pieces = writes
    assert first[1] == len(head)  # the head alone; the body after it
    assert sum(size for _, size, _ in pieces) == len(body)
    assert max(size for _, size, _ in pieces) <= PIECE
    assert max(Counter(turn for turn, _, _ in pieces).values()) == 1
    assert max(unsent for _, _, unsent in pieces) <= HIGH_WATER + PIECE
    # The worker was the slower: the writes waited for it, over more turns than pieces.
    assert pieces[-1][0] - pieces[0][0] > 2 * len(pieces)


def test_a_worker_answering_before_the_body_is_all_sent_gets_a_new_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that answers a 32 MiB request as soon as its head came: the client gets
    the answer, the controller sends no more of that body, and the next request goes on a
    new connection (on the first, what was left of the body would have read as its head)."""
    turns = Turns()
    writes = count_writes(monkeypatch, turns)
    worker = Worker(early=True)
    body = large_body(32 * MIB)
    answers: list[tuple[int, bytes]] = []

    async def relay_twice(http: aiohttp.ClientSession, url: str) -> None:
        with turns:
            for data in (chunks(body), json.dumps({"model": "m"}).encode()):
                async with http.post(f"{url}/worker_generate_stream", data=data) as r:
                    answers.append((r.status, await r.read()))

    run_against(worker, relay_twice)
    assert answers == [(200, ANSWER), (200, ANSWER)]
    assert worker.connections == 2
    assert [h.startswith(b"POST /worker_generate_stream HTTP/1.1\r\n") for h in worker.heads] == [
        True,
        True,
    ]
    assert sum(size for _, size, _ in writes) < len(body)


def test_a_large_body_is_held_once_on_its_way_to_the_worker() -> None:
    """A 32 MiB body arriving in many chunks and relayed: the controller's allocations
    peak at little more than the body itself (it was gathered as it came, and goes on as
    views of it; a join of its chunks, then a copy behind the relay's head, held it three
    times at once)."""
    worker = Worker(per_read=MIB)
    body = large_body(32 * MIB)

    async def relay(http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(f"{url}/worker_generate_stream", data=chunks(body)) as r:
            assert (r.status, await r.read()) == (200, ANSWER)

    peak = traced_peak(worker, relay)
    assert worker.digests == [hashlib.sha256(body).hexdigest()]
    assert peak < 1.5 * len(body)


def test_a_large_worker_answer_is_held_once_on_its_way_to_the_client() -> None:
    """A 48 MiB answer to /worker_generate (within --max-worker-answer-size): the client
    gets it whole, and the controller's allocations peak at about twice the answer: its
    pieces are joined once, each let go as copied (and aiohttp joins it to its head once
    more, on Python before 3.12.9); a copy of it to bytes, in one step, made that three
    times."""
    answer = b'{"text": "' + b"a" * (48 * MIB) + b'", "error_code": 0}'
    worker = Worker(answer=answer)
    got: list[tuple[int, str]] = []

    async def forward(http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(f"{url}/worker_generate", json={"model": "m"}) as r:
            digest = hashlib.sha256()
            async for chunk in r.content.iter_any():
                digest.update(chunk)
            got.append((r.status, digest.hexdigest()))

    peak = traced_peak(worker, forward)
    assert got == [(200, hashlib.sha256(answer).hexdigest())]
    assert peak < 2.5 * len(answer)


async def test_a_large_body_is_joined_a_step_per_turn() -> None:
    """A 32 MiB body that came in 256 KiB chunks is joined into one buffer JOIN_STEP
    bytes per turn of the loop (one join of 63 MiB held the loop 45 ms), byte for byte,
    each chunk let go once copied."""
    body = large_body(32 * MIB)
    chunks = [body[at : at + 256 * 1024] for at in range(0, len(body), 256 * 1024)]
    turns = Turns()
    with turns:
        whole = await joining.joined(chunks)
    assert whole == body
    assert chunks == []
    assert turns.count >= len(body) // joining.JOIN_STEP - 1  # a turn between every two steps


async def test_bytes_trickled_a_few_at_a_time_are_kept_in_few_pieces() -> None:
    """A peer sending its body (or a worker its answer) a byte or a few at a time: the
    controller keeps the bytes in pieces of about COALESCE bytes, not an entry per read,
    and gives them back whole and in order, large chunks among them."""
    chunks = joining.Chunks()
    sent = bytearray()
    for i in range(300_000):
        data = bytes([i % 256]) * (1 + i % 3) if i % 50_000 else b"L" * (200 * 1024)
        chunks.add(data)
        sent += data
    assert chunks.size == len(sent)
    assert len(chunks.parts) <= 2 * (len(sent) // joining.COALESCE) + 2
    assert await chunks.joined() == sent


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_the_rest_of_a_refused_body_is_read_but_never_parsed(
    monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    """A body over --max-body-size (1 MiB here) is refused with 413 and "Connection: close"
    while its client is still sending 24 MiB; the client gets to send all of it and reads
    its 413, the rest reaches aiohttp's parser not at all (it cost a second of the loop for
    oversized's 1.3 GB), and the controller goes on serving. Announced by its length, the
    body is refused before any of it is parsed; chunked, after its first MiB."""
    parsed = [0]
    feed = web_protocol.RequestHandler.data_received

    def counted(self: Any, data: bytes) -> None:
        parsed[0] += len(data)
        feed(self, data)

    monkeypatch.setattr(web_protocol.RequestHandler, "data_received", counted)
    config = ControllerConfig(host="127.0.0.1", port=0, max_body_size=MIB)
    controller = await Controller.serve(config)
    try:
        port = int(controller.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 24 * MIB
        head = b"POST /worker_generate_stream HTTP/1.1\r\nHost: c\r\n"
        if framing == "length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % size)
        else:
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (256 << 10)
        for _ in range(size // len(piece)):
            writer.write(piece if framing == "length" else b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        answer = await reader.read(4096)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413")
        assert b"\r\nConnection: close\r\n" in answer
        assert parsed[0] <= 2 * MIB
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{controller.url}/test_connection") as r:
                assert r.status == 200
    finally:
        await controller.aclose()
