"""The relay's strictness about a worker's HTTP/1.1 answer, streams and single documents alike.

Raw-socket workers (``WireWorker`` from test_relay_wire) send exact bytes, whole and one
byte per write; a raw-socket client reads exactly what the controller sends back, so the
tests see the chunk framing the client gets and not just what an HTTP library makes of it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import ERROR_50006, SERVER_ERROR_MSG, RunController
from .test_relay_wire import (
    CHUNKED_200,
    MESSAGES,
    Reply,
    WireWorker,
    chunked,
    keep_alive,
    register,
    wire_worker,
)

__all__ = ["raw_post", "wire_worker"]

H = b"HTTP/1.1 200 OK\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
MSG = MESSAGES[0]
SIZE = b"%x" % len(MSG)
SIZE1 = b"%x" % len(MESSAGES[1])
GOOD = CHUNKED_200 + chunked(MSG)


def bad_size(size_line: bytes) -> bytes:
    return CHUNKED_200 + size_line + b"\r\n" + MSG + b"\r\n0\r\n\r\n"


MALFORMED = {
    "content-length-negative": H + b"Content-Length: -5\r\n\r\n" + MSG,
    "two-content-lengths": H + b"Content-Length: %d\r\nContent-Length: 9\r\n\r\n" % len(MSG) + MSG,
    # Refused even when equal (llhttp's choice, kept: a proxy need not guess).
    "equal-content-lengths": H + b"Content-Length: %d\r\n" % len(MSG) * 2 + b"\r\n" + MSG,
    "te-with-cl": H + TE + b"Content-Length: %d\r\n\r\n" % len(MSG) + chunked(MSG),
    "cl-with-te": H + b"Content-Length: %d\r\n" % len(MSG) + TE + b"\r\n" + chunked(MSG),
    "obs-folded-te": H + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + chunked(MSG),
    "obs-folded-header": H + b"X-A: a\r\n b\r\n" + TE + b"\r\n" + chunked(MSG),
    "two-te": H + TE + TE + b"\r\n" + chunked(MSG),
    "te-identity": H + b"Transfer-Encoding: identity\r\n\r\n" + MSG,
    "te-chunked-gzip": H + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + MSG,
    "te-gzip-chunked": H + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(MSG),
    "chunk-size-0x": bad_size(b"0x" + SIZE),
    "chunk-size-plus": bad_size(b"+" + SIZE),
    "chunk-size-underscore": bad_size(SIZE[:1] + b"_" + SIZE[1:]),
    "chunk-size-space": bad_size(SIZE + b" "),
    "chunk-no-crlf": CHUNKED_200 + SIZE + b"\r\n" + MSG + b"XX",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "status-four-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status-099": b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
    "status-500": b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
    "switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
    b"Connection: Upgrade\r\n\r\n" + GOOD,
    "http-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(MSG) + MSG,
    "nine-interim": b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + GOOD,
    "bare-lf": b"HTTP/1.1 200 OK\n" + TE + b"\r\n" + chunked(MSG),
    "not-http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "oversized-head": H + b"X-Big: " + b"a" * 200_000 + b"\r\n" + TE + b"\r\n" + chunked(MSG),
    "oversized-trailer": CHUNKED_200 + chunked(MSG)[:-2] + b"X-T: " + b"a" * 17_000 + b"\r\n\r\n",
    "many-trailers": CHUNKED_200 + chunked(MSG)[:-2] + b"X-T: 0123456789\r\n" * 1200 + b"\r\n",
    "message-over-16-mib": CHUNKED_200 + chunked(b"x" * (16 * 1024 * 1024 + 1)),
}
#: too large to send a byte per write in a test
BIG = {"oversized-head", "oversized-trailer", "many-trailers", "message-over-16-mib"}
CASES = [
    pytest.param(name, bytewise, id=f"{name}-{'bytewise' if bytewise else 'whole'}")
    for name in MALFORMED
    for bytewise in (False, True)
    if not (bytewise and name in BIG)
]


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, worker_api_timeout=5)
    )


async def raw_post(url: str, path: str, body: bytes = b'{"model": "m"}') -> tuple[int, bytes]:
    """POST with a raw socket; the status and every byte of the body as sent."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        data = await reader.read()
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def dechunk(raw: bytes) -> list[bytes]:
    """The chunks of a chunked body; fails unless every size is plain hex with no extension
    and the body ends with the last chunk and nothing after it."""
    chunks: list[bytes] = []
    pos = 0
    while True:
        end = raw.index(b"\r\n", pos)
        line = raw[pos:end]
        assert re.fullmatch(rb"[0-9a-f]+", line), line[:40]
        size, pos = int(line, 16), end + 2
        if size == 0:
            assert raw[pos:] == b"\r\n"
            return chunks
        chunks.append(raw[pos : pos + size])
        assert raw[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2


def failures(controller: Controller, worker: WireWorker) -> int:
    entry = controller.registry.get(worker.url)
    assert entry is not None
    return entry.consecutive_failures


@pytest.mark.parametrize(("name", "bytewise"), CASES)
async def test_a_malformed_answer_before_the_first_byte_is_a_worker_failure(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
    name: str,
    bytewise: bool,
) -> None:
    """A stream whose worker answers malformed gets one in-band 50006 error, correctly
    framed; the worker is counted failed and its connection is never reused."""
    worker = await wire_worker(keep_alive(MALFORMED[name], bytewise=bytewise))
    await register(http, controller, worker.url)
    status, raw = await raw_post(controller.url, "/worker_generate_stream")
    assert (status, raw) == (200, ERROR_50006)
    assert failures(controller, worker) == 1
    await raw_post(controller.url, "/worker_generate_stream")
    assert worker.connections == 2


@pytest.mark.parametrize(
    ("name", "bytewise"),
    # 16 MiB without a NUL is a fine document (the bound is max_worker_answer_size).
    [case for case in CASES if case.values[0] != "message-over-16-mib"],
)
async def test_a_malformed_single_document_answer_is_the_worker_error_document(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
    name: str,
    bytewise: bool,
) -> None:
    """/worker_generate through a malformed answer gets the worker-shaped 50006 document
    (HTTP 200, never the worker's framing); the worker is counted failed, not reused."""
    worker = await wire_worker(keep_alive(MALFORMED[name], bytewise=bytewise))
    await register(http, controller, worker.url)
    status, raw = await raw_post(controller.url, "/worker_generate")
    assert status == 200
    assert json.loads(raw) == {"text": SERVER_ERROR_MSG, "error_code": 50006}
    assert failures(controller, worker) == 1
    await raw_post(controller.url, "/worker_generate")
    assert worker.connections == 2


@pytest.mark.parametrize(
    "bad",
    [b"0x" + SIZE1, b"+" + SIZE1, SIZE1[:1] + b"_" + SIZE1[1:], b"zz", b"-1", SIZE1 + b"X"],
    ids=["0x", "plus", "underscore", "not-hex", "negative", "no-crlf"],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
async def test_a_malformed_chunk_after_the_first_byte_ends_the_stream_in_band(
    controller: Controller,
    http: aiohttp.ClientSession,
    wire_worker: Callable[[Reply], Awaitable[WireWorker]],
    bad: bytes,
    bytewise: bool,
) -> None:
    """After a message reached the client, a bad chunk ends the stream with the in-band
    error in a chunk of its own and the last chunk: the worker's bad line never passes."""
    first = CHUNKED_200 + chunked(MESSAGES[0])[:-5]
    # One chunk in a read of its own, as the relay's verbatim path would take it.
    then = bad + b"\r\n" + MESSAGES[1] + b"\r\n"
    client_has_first = asyncio.Event()

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(first)
        await writer.drain()
        await client_has_first.wait()
        for piece in [then[i : i + 1] for i in range(len(then))] if bytewise else [then]:
            writer.write(piece)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await reader.read(1)  # until the controller hangs up
        return False

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    parts = urlsplit(controller.url)
    assert parts.hostname is not None and parts.port is not None
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        body = b'{"model": "m"}'
        writer.write(
            b"POST /worker_generate_stream HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        received = await reader.readuntil(b"\0")
        client_has_first.set()
        received += await reader.read()
        writer.close()
    head, _, raw = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert dechunk(raw) == [MESSAGES[0], ERROR_50006]
    assert failures(controller, worker) == 1
