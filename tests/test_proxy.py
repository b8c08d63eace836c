"""The streaming relay: message by message, silence-bounded, errors in-band, upstream closed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import ERROR_50006, MakeWorker, RunController, register_body, split_stream

API_TIMEOUT = 0.3


def config(**overrides: Any) -> ControllerConfig:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "load_poll_interval": 0}
    settings.update(overrides)
    return ControllerConfig(**settings)


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(config())


@pytest.fixture
async def impatient(run_controller: RunController) -> Controller:
    """A controller that tolerates only API_TIMEOUT seconds of silence from a worker."""
    return await run_controller(config(worker_api_timeout=API_TIMEOUT))


async def register(http: aiohttp.ClientSession, controller: Controller, body: Any) -> None:
    async with http.post(f"{controller.url}/register_worker", json=body) as r:
        assert r.status == 200


async def stream(http: aiohttp.ClientSession, controller: Controller, body: Any = None) -> bytes:
    """The whole answer of /worker_generate_stream (read within 5 s)."""
    async with asyncio.timeout(5):
        async with http.post(
            f"{controller.url}/worker_generate_stream", json=body or {"model": "m"}
        ) as r:
            assert r.status == 200
            return await r.read()


async def test_messages_reach_the_client_while_the_worker_is_still_generating(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """Each message is forwarded as it arrives: the client has two while the worker hangs."""
    worker = await make_worker(tokens=5, hang_after=2)
    await register(http, controller, register_body(worker))
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        async with asyncio.timeout(2):
            first = await r.content.readuntil(b"\0")
            second = await r.content.readuntil(b"\0")
        assert (first, second) == (worker.message(0), worker.message(1))
        # The worker has not finished: it is waiting to be released.
        assert worker.active == 1
        assert not r.content.at_eof()
        worker.release.set()
        rest = await r.read()
    assert rest == b"".join(worker.message(i) for i in range(2, 5))


async def test_long_stream_with_short_gaps_is_never_cut(
    impatient: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """The worker API timeout bounds the silence between reads, not the whole stream."""
    worker = await make_worker(tokens=8, token_delay=0.1)
    await register(http, impatient, register_body(worker))
    loop = asyncio.get_running_loop()
    started = loop.time()
    raw = await stream(http, impatient)
    assert loop.time() - started > 2 * API_TIMEOUT
    assert raw == b"".join(worker.message(i) for i in range(8))


async def test_worker_silent_past_the_timeout_ends_with_50006_after_what_it_sent(
    impatient: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker silent longer than the timeout: the messages so far, then one 50006 message."""
    worker = await make_worker(tokens=4, hang_after=2)
    await register(http, impatient, register_body(worker))
    raw = await stream(http, impatient)
    assert raw == worker.message(0) + worker.message(1) + ERROR_50006
    # The controller gave up on the worker's request rather than leaving it open.
    await asyncio.wait_for(worker.upstream_gone.wait(), 2)


async def test_worker_dying_mid_stream_ends_with_50006_after_what_it_sent(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker that drops the connection mid-stream: the messages so far, then 50006."""
    worker = await make_worker(tokens=4, die_after=2)
    await register(http, controller, register_body(worker))
    raw = await stream(http, controller)
    assert raw == worker.message(0) + worker.message(1) + ERROR_50006
    assert [m["error_code"] for m in split_stream(raw)] == [0, 0, 50006]


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"stream_status": 500}, id="http-500"),
        pytest.param({"stream_status": 404}, id="http-404"),
        pytest.param({"drop_at_once": True}, id="drops-before-headers"),
        pytest.param({"die_after": 0}, id="dies-before-first-message"),
        pytest.param({"hang_after": 0}, id="silent-from-the-start"),
    ],
)
async def test_worker_failing_before_its_first_message_gives_one_50006(
    impatient: Controller,
    http: aiohttp.ClientSession,
    make_worker: MakeWorker,
    knobs: dict[str, Any],
) -> None:
    """A worker that fails before sending anything gives exactly one 50006 message."""
    worker = await make_worker(**knobs)
    await register(http, impatient, register_body(worker))
    assert await stream(http, impatient) == ERROR_50006
    assert len(worker.stream_bodies) == 1


async def test_refused_connection_gives_one_50006(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker whose port is closed gives exactly one 50006 message."""
    worker = await make_worker()
    await register(http, controller, register_body(worker))
    await worker.stop()
    assert await stream(http, controller) == ERROR_50006


async def test_messages_split_across_writes_reach_the_client_whole(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker writing each message in two pieces still gives the client whole messages."""
    worker = await make_worker(tokens=3, split=True, split_gap=0.05)
    await register(http, controller, register_body(worker))
    chunks = []
    async with asyncio.timeout(5):
        async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
            async for chunk in r.content.iter_any():
                chunks.append(chunk)
    # The worker pauses mid-message, so a relay of raw pieces would show here as a chunk
    # that does not end with NUL.
    assert all(chunk.endswith(b"\0") for chunk in chunks), chunks
    assert b"".join(chunks) == b"".join(worker.message(i) for i in range(3))


async def test_request_body_reaches_the_worker_byte_for_byte(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """The client's body is forwarded unchanged: spacing, key order, unknown keys, Unicode."""
    worker = await make_worker(tokens=1)
    await register(http, controller, register_body(worker))
    body = (
        b'{"prompt" :  "h\\u00e9llo \xc3\xa9\\n",\n "model":"m", "temperature": 0.70,'
        b' "stop": null, "images": ["data:image/png;base64,AAAA"], "echo": false}  \n'
    )
    async with http.post(f"{controller.url}/worker_generate_stream", data=body) as r:
        assert r.status == 200
        await r.read()
    assert worker.stream_bodies == [body]


async def test_client_leaving_closes_the_request_to_the_worker_at_once(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A client that disconnects mid-stream makes the controller drop the worker's request."""
    worker = await make_worker(tokens=3, hang_after=1)
    await register(http, controller, register_body(worker))
    r = await http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"})
    assert await asyncio.wait_for(r.content.readuntil(b"\0"), 2) == worker.message(0)
    r.close()
    await asyncio.wait_for(worker.upstream_gone.wait(), 2)
