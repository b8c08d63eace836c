"""Single-document relays counted and watched like streams, and the access log's byte count.

The controller runs inside a host application here, so a middleware can read what aiohttp's
access log would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig

from .conftest import RunController, register_body, wait_until
from .test_relay_strict import GOOD, raw_post
from .test_relay_wire import (
    CHUNKED_200,
    MESSAGES,
    Reply,
    WireWorker,
    chunked,
    register,
    wire_worker,
)

__all__ = ["wire_worker"]

Make = Callable[[Reply], Awaitable[WireWorker]]


@pytest.fixture
async def hosted() -> AsyncIterator[tuple[Controller, TestServer, list[int]]]:
    """A controller in a host app; the body lengths its responses report, logged."""
    lengths: list[int] = []

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        lengths.append(response.body_length)  # what the access log's %b reads
        return response

    app = web.Application(middlewares=[record])
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, drain_timeout=0.2)
    controller = await Controller.start(app, config)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield controller, server, lengths
    await server.close()


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def register_at(server: TestServer, worker: WireWorker) -> None:
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    body = register_body(worker.url, worker_status=status)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url(server)}/register_worker", json=body) as r:
            assert r.status == 200


async def test_a_forwarded_generation_stays_counted_after_a_heartbeat(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """A slow /worker_generate is still counted in the worker's load after the worker
    reports its queue, like a stream: not presumed finished."""
    controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
    release = asyncio.Event()

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(GOOD)
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    call = asyncio.create_task(raw_post(controller.url, "/worker_generate"))
    await wait_until(lambda: worker.requests == 1)
    beat = {"worker_name": worker.url, "queue_length": 1}
    async with http.post(f"{controller.url}/receive_heart_beat", json=beat) as r:
        assert await r.json() == {"exist": True}
    entry = controller.registry.get(worker.url)
    assert entry is not None
    assert entry.load.active_streams == 1
    release.set()
    await call
    assert entry.load.active_streams == 0


async def test_a_single_document_call_whose_client_left_is_stopped_at_the_worker(
    hosted: tuple[Controller, TestServer, list[int]], wire_worker: Make
) -> None:
    """A client that leaves while its worker thinks drops the worker connection."""
    _controller, server, _ = hosted
    gone = asyncio.Event()

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.read(1)  # returns when the controller hangs up
        gone.set()
        return False

    worker = await wire_worker(reply)
    await register_at(server, worker)
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = b'{"model": "m"}'
    writer.write(
        b"POST /worker_generate HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    await wait_until(lambda: worker.requests == 1)
    writer.close()
    async with asyncio.timeout(5):
        await gone.wait()


async def test_the_shutdown_drain_ends_a_single_document_call(
    hosted: tuple[Controller, TestServer, list[int]], wire_worker: Make
) -> None:
    """A single-document call still running when the drain times out gets the error
    document instead of being cut."""
    controller, server, _ = hosted

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.read(1)
        return False

    worker = await wire_worker(reply)
    await register_at(server, worker)
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(http.post(f"{url(server)}/worker_generate", json={"model": "m"}))
        await wait_until(lambda: worker.requests == 1)
        await controller.relay.drain()
        # Ended by the drain, not by the worker API timeout (100 s) running out.
        async with asyncio.timeout(5):
            response = await call
        async with response as r:
            assert r.status == 200
            assert (await r.json())["error_code"] == 50006


async def test_the_access_log_counts_every_byte_of_a_stream(
    hosted: tuple[Controller, TestServer, list[int]], wire_worker: Make
) -> None:
    """A relayed stream's body_length (the access log's byte count) is what was sent,
    messages written straight to the client's transport included."""
    _, server, lengths = hosted
    client_has_first = asyncio.Event()

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(CHUNKED_200 + chunked(MESSAGES[0])[:-5])
        await writer.drain()
        await client_has_first.wait()
        writer.write(chunked(MESSAGES[1]))
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register_at(server, worker)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = b'{"model": "m"}'
    writer.write(
        b"POST /worker_generate_stream HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(5):
        received = await reader.readuntil(b"\0")
        client_has_first.set()
        received += await reader.read()
    writer.close()
    assert received.endswith(MESSAGES[1] + b"\r\n0\r\n\r\n")
    # The registration's plain response is counted only after the middleware saw it.
    await wait_until(lambda: len(lengths) == 2)
    assert lengths[-1] == len(received)
