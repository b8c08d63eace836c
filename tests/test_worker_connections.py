"""--max-worker-connections: the connections the controller holds open to workers, all
together, stay under the cap through a burst larger than it, and every request still
completes or fails cleanly (issue 16)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest

from controller import Controller, ControllerConfig

from .conftest import ERROR_50006, RunController, post_ok, register_body, wait_until

BOUND = 10.0


@attrs.define(eq=False)
class Tally:
    """What several workers saw, together."""

    #: status probes being answered (or held) right now, and the most at once
    probing: int = 0
    probing_peak: int = 0
    probes: int = 0
    #: connections open to any of the workers, and the most at once
    open: int = 0
    open_peak: int = 0


@attrs.define(eq=False)
class CountingWorker:
    """A worker on a raw asyncio server that counts the connections open to it (and the
    most at once), holds each stream's answer until ``release`` and, with
    ``status_delay`` seconds, each status answer (a slow worker)."""

    tally: Tally = attrs.Factory(Tally)
    status_delay: float = 0.0
    tokens: int = 2
    model: str = "m"
    open: int = 0
    peak: int = 0
    #: stream requests that have arrived
    streams: int = 0
    release: asyncio.Event = attrs.Factory(asyncio.Event)
    server: asyncio.Server | None = None
    url: str = ""
    _serving: dict[asyncio.StreamWriter, asyncio.Task[Any]] = attrs.Factory(dict)

    async def start(self) -> CountingWorker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        """Stop listening and end every connection, waiting for their handlers."""
        self.release.set()
        if self.server is not None:
            self.server.close()
        handlers = list(self._serving.values())
        for writer in list(self._serving):
            writer.close()  # the handler reads EOF and ends
        if handlers:
            await asyncio.wait(handlers, timeout=BOUND)

    def status(self) -> dict[str, Any]:
        return {"model_names": [self.model], "speed": 1, "queue_length": 0}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving[writer] = task
        self.open += 1
        self.peak = max(self.peak, self.open)
        tally = self.tally
        tally.open += 1
        tally.open_peak = max(tally.open_peak, tally.open)
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self.tally.open -= 1
            del self._serving[writer]
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; ``False`` once the controller closed the connection."""
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except asyncio.IncompleteReadError:
            return False
        path = head.split(" ", 2)[1]
        length = 0
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        if path.endswith("/worker_get_status"):
            tally = self.tally
            tally.probes += 1
            tally.probing += 1
            tally.probing_peak = max(tally.probing_peak, tally.probing)
            if self.status_delay:
                await asyncio.sleep(self.status_delay)  # the worker's own slowness
            tally.probing -= 1  # answered: the next probe may come only after this
            body = json.dumps(self.status()).encode()
        else:
            self.streams += 1
            if not await self._held(reader):
                return False
            body = b"".join(
                json.dumps({"text": f"tok{i}", "error_code": 0}).encode() + b"\0"
                for i in range(self.tokens)
            )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        return True

    async def _held(self, reader: asyncio.StreamReader) -> bool:
        """Wait for ``release``; ``False`` if the controller closes the connection first."""
        released = asyncio.ensure_future(self.release.wait())
        gone = asyncio.ensure_future(reader.read())  # nothing more comes but the close
        done, pending = await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)  # the read is over before the next one starts
        return released in done


MakeCounting = Callable[..., Awaitable[CountingWorker]]


@pytest.fixture
async def make_counting() -> AsyncIterator[MakeCounting]:
    workers: list[CountingWorker] = []

    async def make(**knobs: Any) -> CountingWorker:
        worker = await CountingWorker(**knobs).start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close()


async def stream(http: aiohttp.ClientSession, controller: Controller, model: str = "m") -> bytes:
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": model}) as r:
        assert r.status == 200
        return await r.read()


async def register(
    http: aiohttp.ClientSession, controller: Controller, worker: CountingWorker
) -> None:
    """Register a counting worker with what it says of itself."""
    body = register_body(worker.url) | {"worker_status": worker.status()}
    await post_ok(http, controller, "/register_worker", body)


async def test_a_burst_larger_than_the_cap_never_opens_more_connections_than_it(
    run_controller: RunController, make_counting: MakeCounting, http: aiohttp.ClientSession
) -> None:
    """With --max-worker-connections 8 (7 for relays, 1 for probes), 30 streams at once
    open 7 connections to the worker, as the worker counts them; the 23 others wait and
    go out on those connections as they free, and all 30 complete. (Load polls are off
    here, so that the relays' share is all the worker sees.)"""
    worker = await make_counting()
    config = ControllerConfig(
        host="127.0.0.1", port=0, max_worker_connections=8, load_poll_interval=0
    )
    controller = await run_controller(config)
    await register(http, controller, worker)
    streams = [asyncio.ensure_future(stream(http, controller)) for _ in range(30)]
    await wait_until(lambda: worker.streams == 7 and controller.pool.waiting == 23, BOUND)
    assert worker.open == 7
    worker.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*streams), BOUND)
    expected = b'{"text": "tok0", "error_code": 0}\0{"text": "tok1", "error_code": 0}\0'
    assert answers == [expected] * 30
    assert worker.streams == 30
    assert worker.peak == 7


async def test_idle_connections_to_one_worker_make_room_for_another(
    run_controller: RunController, make_counting: MakeCounting, http: aiohttp.ClientSession
) -> None:
    """With the relays' 7 connections all idle towards worker A after a burst, a burst to
    worker B closes them to make room instead of waiting for them to age out: B's streams
    complete (well within a 1 s connect timeout, where idle connections live 4 s), and
    the two workers together never see more than 7 connections."""
    tally = Tally()
    first = await make_counting(tally=tally)
    second = await make_counting(tally=tally, model="b")
    second.release.set()
    config = ControllerConfig(
        host="127.0.0.1",
        port=0,
        max_worker_connections=8,
        load_poll_interval=0,
        status_probe_timeout=1.0,
    )
    controller = await run_controller(config)
    for worker in (first, second):
        await register(http, controller, worker)
    burst = asyncio.gather(*(stream(http, controller) for _ in range(7)))
    await wait_until(lambda: first.streams == 7, BOUND)
    first.release.set()
    await asyncio.wait_for(burst, BOUND)
    assert controller.pool.idle_count() == first.open == 7
    answers = await asyncio.wait_for(
        asyncio.gather(*(stream(http, controller, "b") for _ in range(7))), BOUND
    )
    assert all(answer.startswith(b'{"text": "tok0"') for answer in answers)
    assert second.streams == 7
    assert tally.open_peak == 7


async def test_a_request_that_waits_too_long_for_a_connection_fails_cleanly(
    run_controller: RunController, make_counting: MakeCounting, http: aiohttp.ClientSession
) -> None:
    """A stream that finds no connection free within --status-probe-timeout (the connect
    timeout) ends with the in-band worker error, like an unreachable worker, but the
    worker is not blamed: it stays in rotation and the streams it holds complete. Load polls
    of the busy worker run meanwhile: relays and probes together stay within the 8."""
    worker = await make_counting()
    config = ControllerConfig(
        host="127.0.0.1", port=0, max_worker_connections=8, status_probe_timeout=0.3
    )
    controller = await run_controller(config)
    await register(http, controller, worker)
    streams = [asyncio.ensure_future(stream(http, controller)) for _ in range(10)]
    await wait_until(lambda: worker.streams == 7, BOUND)
    await wait_until(lambda: sum(s.done() for s in streams) == 3, BOUND)
    refused = [s.result() for s in streams if s.done()]
    assert refused == [ERROR_50006] * 3
    entry = controller.registry.get(worker.url)
    assert entry is not None and entry.consecutive_failures == 0
    worker.release.set()
    served = await asyncio.wait_for(asyncio.gather(*streams), BOUND)
    assert sum(answer != ERROR_50006 for answer in served) == 7
    assert worker.peak <= 8


async def test_status_probes_keep_to_their_share_of_the_cap(
    run_controller: RunController, make_counting: MakeCounting, http: aiohttp.ClientSession
) -> None:
    """With --max-worker-connections 8, status probes get one connection: a refresh of
    three workers that take 0.2 s to answer probes them one after another (never two at
    once, as the workers see it), and each probe's 0.3 s timeout starts only when its turn
    comes, so the three are still registered afterwards."""
    tally = Tally()
    workers = [await make_counting(tally=tally, status_delay=0.2) for _ in range(3)]
    config = ControllerConfig(
        host="127.0.0.1",
        port=0,
        max_worker_connections=8,
        status_probe_timeout=0.3,
        load_poll_interval=0,
    )
    controller = await run_controller(config)
    for worker in workers:
        body = register_body(worker.url) | {"worker_status": worker.status()}
        await post_ok(http, controller, "/register_worker", body)
    await asyncio.wait_for(post_ok(http, controller, "/refresh_all_workers"), BOUND)
    assert tally.probes == 3
    assert tally.probing_peak == 1
    assert all(controller.registry.get(worker.url) is not None for worker in workers)
