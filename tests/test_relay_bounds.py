"""Bounds on a worker's answer and the relay defects of issue 14, against raw-socket workers.

The head must be complete within the read timeout as a whole; at most 8 interim answers;
chunk extensions never reach the client; a connection that carried anything wrong is never
reused; a timeout on a reused connection is not retried; an address that cannot be encoded
is that worker's failure; single documents are bounded, counted in the worker's load while
they run, stopped when their client leaves; the bytes held across relays are bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp

from controller import ControllerConfig
from controller.decisions.models import WorkerInfo

from .conftest import ERROR_50006, SERVER_ERROR_MSG, RunController, wait_until
from .test_relay_strict import GOOD, MSG, dechunk, failures, raw_post
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

__all__ = ["wire_worker"]

ERROR_DOCUMENT = {"text": SERVER_ERROR_MSG, "error_code": 50006}
Make = Callable[[Reply], Awaitable[WireWorker]]


def config(**changes: object) -> ControllerConfig:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "load_poll_interval": 0,
        "worker_api_timeout": 5,
    }
    settings.update(changes)
    return ControllerConfig(**settings)  # type: ignore[arg-type]


def document(size: int) -> bytes:
    return json.dumps({"text": "d" * (size - 29), "error_code": 0}).encode()


async def test_a_head_that_trickles_in_fails_at_the_read_timeout(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """A worker sending its head a byte at a time, each well within the timeout, still
    fails once the head as a whole has taken longer than worker_api_timeout."""
    controller = await run_controller(config(worker_api_timeout=0.3))

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for i in range(len(CHUNKED_200)):
            writer.write(CHUNKED_200[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.05)  # the worker's own pace, not a synchronisation
        writer.write(chunked(MSG))
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, ERROR_50006)
    assert failures(controller, worker) == 1


async def test_eight_interim_answers_are_allowed(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """Up to 8 interim (1xx) answers before the real one are skipped."""
    controller = await run_controller(config())
    worker = await wire_worker(keep_alive(b"HTTP/1.1 100 Continue\r\n\r\n" * 8 + GOOD))
    await register(http, controller, worker.url)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))


async def test_chunk_extensions_are_stripped_and_plain_chunks_pass_as_they_came(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """Chunks with extensions are re-framed without them; a plain chunk of whole messages
    reaches the client byte for byte as the worker framed it."""
    controller = await run_controller(config())
    answers = [CHUNKED_200 + chunked(*MESSAGES, ext=b";x=y"), GOOD]

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answers[n])
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    status, raw = await raw_post(controller.url, "/worker_generate_stream")
    assert status == 200 and b";" not in raw
    assert b"".join(dechunk(raw)) == b"".join(MESSAGES)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))


async def test_bytes_after_the_answer_keep_the_connection_out_of_the_pool(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """An answer followed by stray bytes is relayed, but its connection is not reused."""
    controller = await run_controller(config())
    worker = await wire_worker(keep_alive(GOOD + b"HTTP/1.1 200 OK\r\n"))
    await register(http, controller, worker.url)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))
    assert worker.connections == 2


async def test_a_timeout_on_a_reused_connection_is_not_retried(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """A worker that is merely slow on a kept-alive connection gets the request once: the
    client gets the error after one timeout, not a second request."""
    controller = await run_controller(config(worker_api_timeout=0.2))

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if n == 0:
            writer.write(GOOD)
            await writer.drain()
            return True
        await reader.read(1)  # silent until the controller gives up
        return False

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, ERROR_50006)
    assert worker.requests == 2


async def test_a_worker_address_that_cannot_be_encoded_is_that_workers_failure(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """A worker named with a path HTTP cannot carry ('€') fails over to the next worker and
    is counted failed, for streams and single documents: never a 500. (Registration refuses
    such names; one restored from an old state file still gets here.)"""
    controller = await run_controller(config())
    good = await wire_worker(keep_alive(GOOD))
    bad_name = good.url + "/€"
    controller.registry.register(WorkerInfo(bad_name, ("m",), 1, False), 0)
    await register(http, controller, good.url)
    assert await raw_post(controller.url, "/worker_generate_stream") == (200, chunked(MSG))
    entry = controller.registry.get(bad_name)
    assert entry is not None and entry.consecutive_failures == 1
    alone = good.url + "/only/€"
    controller.registry.register(WorkerInfo(alone, ("e",), 1, False), 0)
    status, raw = await raw_post(controller.url, "/count_token", b'{"model": "e"}')
    assert (status, json.loads(raw)) == (200, ERROR_DOCUMENT)
    entry = controller.registry.get(alone)
    assert entry is not None and entry.consecutive_failures == 1


async def test_a_document_larger_than_the_answer_limit_gets_the_error_document(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """An answer past max_worker_answer_size, announced by Content-Length or growing in
    chunks, gets the worker error document; the connection is dropped; the worker's health
    is untouched (another worker would answer as much)."""
    controller = await run_controller(config(max_worker_answer_size=1000))
    big = document(1500)
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        CHUNKED_200 + chunked(big[:600], big[600:]),
        b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n" + document(900),
    ]

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answers[n])
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    for _ in range(2):
        status, raw = await raw_post(controller.url, "/worker_generate")
        assert (status, json.loads(raw)) == (200, ERROR_DOCUMENT)
    assert await raw_post(controller.url, "/worker_generate") == (200, document(900))
    assert worker.connections == 3
    assert failures(controller, worker) == 0
    assert controller.relay.budget.used == 0


async def test_a_document_that_cannot_reserve_its_size_fails_at_once(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """With the shared buffer budget held by a stream, a document that does not fit gets
    the error document at once instead of waiting; it fits again once the budget frees."""
    controller = await run_controller(config(max_buffered_bytes=1000))
    finish = asyncio.Event()
    small = document(300)

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = json.loads(worker.bodies[n])
        if "stream" in body:  # a stream holding 800 bytes of a message still arriving
            writer.write(CHUNKED_200 + chunked(b"s" * 800)[:-5])
            await writer.drain()
            await finish.wait()
            writer.write(chunked(b"\0"))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(small) + small)
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    stream = asyncio.create_task(
        raw_post(controller.url, "/worker_generate_stream", b'{"model": "m", "stream": 1}')
    )
    await wait_until(lambda: controller.relay.budget.used == 800)
    status, raw = await raw_post(controller.url, "/worker_generate")
    assert (status, json.loads(raw)) == (200, ERROR_DOCUMENT)
    finish.set()
    assert await stream == (200, chunked(b"s" * 800 + b"\0"))
    assert await raw_post(controller.url, "/worker_generate") == (200, small)
    assert failures(controller, worker) == 0


async def test_a_stream_over_the_budget_waits_and_resumes(
    run_controller: RunController, http: aiohttp.ClientSession, wire_worker: Make
) -> None:
    """A stream whose partial message would pass max_buffered_bytes stops reading from its
    worker until another stream's message completes; both then finish whole."""
    controller = await run_controller(config(max_buffered_bytes=1000))
    go = {0: asyncio.Event(), 1: asyncio.Event()}

    async def reply(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = json.loads(worker.bodies[n])
        size = body["size"]
        writer.write(CHUNKED_200 + chunked(bytes([97 + n]) * size)[:-5])
        await writer.drain()
        await go[n].wait()
        writer.write(chunked(b"\0"))
        await writer.drain()
        return True

    worker = await wire_worker(reply)
    await register(http, controller, worker.url)
    first = asyncio.create_task(
        raw_post(controller.url, "/worker_generate_stream", b'{"model": "m", "size": 800}')
    )
    await wait_until(lambda: controller.relay.budget.used == 800)
    second = asyncio.create_task(
        raw_post(controller.url, "/worker_generate_stream", b'{"model": "m", "size": 500}')
    )
    await wait_until(lambda: controller.relay.budget.parked == 1)
    go[1].set()  # the parked stream's worker sends its NUL: unread while parked
    go[0].set()
    assert await first == (200, chunked(b"a" * 800 + b"\0"))
    assert await second == (200, chunked(b"b" * 500 + b"\0"))
    assert controller.relay.budget.used == 0
