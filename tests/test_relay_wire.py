"""The relay's own HTTP/1.1 client: framings, kept-alive connections, TLS, a slow client.

The worker side of a relayed stream is parsed by the controller itself
(controller/relay/upstream.py), so these workers speak raw bytes from an ``asyncio`` server
on a loopback port: every framing a worker may use, split at awkward places, and
connections that close between requests.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig
from controller.relay.pool import IDLE_TIMEOUT

from .conftest import (
    ERROR_50006,
    FakeClock,
    RunController,
    register_body,
    split_stream,
    wait_until,
)


def message(i: int) -> bytes:
    return json.dumps({"text": "x" * (i + 1), "error_code": 0}).encode() + b"\0"


MESSAGES = [message(i) for i in range(3)]
BODY = b"".join(MESSAGES)
HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
CHUNKED_200 = HEAD_200 + b"Transfer-Encoding: chunked\r\n\r\n"

Reply = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class WireWorker:
    """A worker that answers each request with the bytes ``reply`` writes.

    ``reply(n, reader, writer)`` is called for the n-th request (from 0, across connections)
    after its head and body were read; it returns whether to keep the connection open for
    another request. ``connections`` counts the connections the worker accepted.
    """

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests = 0
        self.connections = 0
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> WireWorker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length))
                n, self.requests = self.requests, self.requests + 1
                if not await self.reply(n, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def chunked(*pieces: bytes, ext: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces) + b"0\r\n\r\n"


async def send_bytewise(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Every byte in a write of its own, so the relay meets every possible split."""
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()


@pytest.fixture
async def wire_worker() -> AsyncIterator[Callable[[Reply], Awaitable[WireWorker]]]:
    workers: list[WireWorker] = []

    async def make(reply: Reply) -> WireWorker:
        worker = await WireWorker(reply).start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close()


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, worker_api_timeout=2)
    )


async def register(http: aiohttp.ClientSession, controller: Controller, url: str) -> None:
    body = register_body(url, worker_status={"model_names": ["m"], "speed": 1, "queue_length": 0})
    async with http.post(f"{controller.url}/register_worker", json=body) as r:
        assert r.status == 200


async def stream(http: aiohttp.ClientSession, controller: Controller) -> bytes:
    async with asyncio.timeout(5):
        async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
            assert r.status == 200
            return await r.read()


def keep_alive(answer: bytes, *, bytewise: bool = False) -> Reply:
    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if bytewise:
            await send_bytewise(writer, answer)
        else:
            writer.write(answer)
            await writer.drain()
        return True

    return reply


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(CHUNKED_200 + chunked(BODY), id="chunked"),
        pytest.param(
            CHUNKED_200 + chunked(BODY[:7], BODY[7:]),
            id="chunks-split-mid-message",
        ),
        pytest.param(
            CHUNKED_200 + chunked(*MESSAGES, ext=b";x=y"),
            id="chunk-extensions",
        ),
        pytest.param(
            HEAD_200
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + chunked(BODY)[:-2]
            + b"X-Trailer: 1\r\n\r\n",
            id="chunked-with-trailer",
        ),
        pytest.param(
            HEAD_200 + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY, id="content-length"
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            + HEAD_200
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + chunked(BODY),
            id="after-100-continue",
        ),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
async def test_every_framing_reaches_the_client_as_the_same_messages(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
    answer: bytes,
    bytewise: bool,
) -> None:
    """However the worker frames and splits its answer, the client gets the same messages;
    and the connection serves the next stream too."""
    worker = await wire_worker(keep_alive(answer, bytewise=bytewise))
    await register(http, controller, worker.url)
    assert await stream(http, controller) == BODY
    assert await stream(http, controller) == BODY
    assert worker.connections == 1


async def test_close_delimited_answer_is_relayed_whole(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
) -> None:
    """An HTTP/1.0-style answer, ended by closing the connection, is a complete stream."""

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + BODY[:-1])  # the last NUL left off
        await writer.drain()
        return False

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await stream(http, controller) == BODY
    assert await stream(http, controller) == BODY
    assert worker.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(HEAD_200 + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(b"SSH-2.0-OpenSSH\r\n\r\n", id="not-http"),
        pytest.param(HEAD_200 + b"Content-Length: x\r\n\r\n", id="bad-content-length"),
        pytest.param(CHUNKED_200 + b"5\r\nabcdeXX", id="chunk-no-crlf"),
    ],
)
async def test_garbage_from_a_worker_is_an_in_band_error_and_the_worker_is_dropped(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
    answer: bytes,
) -> None:
    """A worker that breaks HTTP gets the client one 50006 message; its connection is not
    reused (the next stream opens a new one)."""
    worker = await wire_worker(keep_alive(answer))
    await register(http, controller, worker.url)
    assert await stream(http, controller) == ERROR_50006
    # Out of rotation now, but the only worker of its model: tried all the same.
    assert await stream(http, controller) == ERROR_50006
    assert worker.connections == 2


async def test_connection_closed_by_the_worker_between_streams_costs_nothing(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
) -> None:
    """A kept-alive connection that the worker closes as the next request arrives (the
    keep-alive race) is retried once on a new connection: the client sees a normal stream
    and the worker stays in rotation."""
    answer = CHUNKED_200 + chunked(BODY)

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            return False  # read the request, then close without a byte of answer
        writer.write(answer)
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await stream(http, controller) == BODY
    assert await stream(http, controller) == BODY
    assert (worker.requests, worker.connections) == (3, 2)
    entry = controller.registry.get(worker.url)
    assert entry is not None and entry.consecutive_failures == 0


async def test_worker_closing_after_a_partial_answer_is_not_retried(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
) -> None:
    """Once any byte of the answer came, a failure is the worker's: no second request."""
    answer = CHUNKED_200 + chunked(BODY)

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer[:20] if n == 1 else answer)
        await writer.drain()
        return n != 1

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await stream(http, controller) == BODY
    assert await stream(http, controller) == ERROR_50006
    assert worker.requests == 2


async def test_streams_share_kept_alive_connections_and_idle_ones_are_closed(
    run_controller: RunController,
    clock: FakeClock,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
) -> None:
    """Sequential streams reuse one connection; two at once use two; connections idle
    past the idle timeout are closed by the controller."""
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, worker_api_timeout=2)
    controller = await run_controller(config, clock=clock)
    release = asyncio.Event()
    answer = CHUNKED_200

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer + chunked(MESSAGES[0])[:-5])
        await writer.drain()
        if n in (1, 2):
            await release.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await stream(http, controller) == MESSAGES[0]
    both = asyncio.gather(stream(http, controller), stream(http, controller))
    await wait_until(lambda: worker.requests == 3)
    release.set()
    # gather() gives a list; typeshed says a tuple (for two awaitables): compare as a list.
    assert list(await both) == [MESSAGES[0], MESSAGES[0]]
    assert worker.connections == 2
    assert controller.pool.idle_count() == 2
    clock.advance(IDLE_TIMEOUT - 0.5)
    assert controller.pool.prune() == 0
    clock.advance(1.0)
    assert controller.pool.prune() == 2
    assert controller.pool.idle_count() == 0


async def test_a_client_that_stops_reading_holds_the_worker_back(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """The relay reads from the worker only as fast as the client reads: the worker can
    never get more than the socket buffers ahead, and the client gets every byte."""
    piece = json.dumps({"text": "y" * 16_000, "error_code": 0}).encode() + b"\0"
    total = 4000  # 64 MB
    sent = 0

    async def generate(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(total):
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/worker_generate_stream", generate)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        await register(http, controller, url)
        async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
            first = await r.content.readuntil(b"\0")
            # The client reads nothing more while the loop runs many rounds: plenty for
            # the worker (on this loop too) to send all 64 MB if nothing held it back.
            for _ in range(5000):
                await asyncio.sleep(0)
            held_at = sent
            rest = await r.read()
        assert held_at < 32 * 1024 * 1024
        assert len(first) + len(rest) == total * len(piece)
        assert split_stream(first + rest[: len(piece)]) == [json.loads(piece[:-1])] * 2
    finally:
        await server.close()


async def test_tls_worker_is_relayed_with_the_certificate_checked(
    controller: Controller,
    http: aiohttp.ClientSession,
    certificate: tuple[Path, Path],
) -> None:
    """An https:// worker (FastChat's --ssl) is relayed over TLS, verified against the trusted
    certificates; an untrusted certificate fails before the first byte, in band."""
    key, cert = certificate

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for m in MESSAGES:
            await response.write(m)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/worker_generate_stream", generate)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=server_context)
    try:
        url = f"https://127.0.0.1:{server.port}"
        await register(http, controller, url)
        # Untrusted first (the system store knows nothing of this certificate).
        controller.pool.ssl_context = ssl.create_default_context()
        assert await stream(http, controller) == ERROR_50006
        controller.pool.ssl_context = ssl.create_default_context(cafile=cert)
        assert split_stream(await stream(http, controller)) == [
            json.loads(m[:-1]) for m in MESSAGES
        ]
    finally:
        await server.close()
