"""Shared fixtures: real fake workers on loopback ports, and controllers to test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig


@attrs.define
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@attrs.define(eq=False)
class FakeWorker:
    """A FastChat-shaped worker on a real loopback port, with knobs for misbehaviour.

    ``tokens`` messages are streamed with cumulative text; ``hang_after`` stops sending (but
    keeps the connection open) after that many messages; ``die_after`` drops the connection
    after that many; ``split`` sends each message in two writes to exercise reassembly;
    ``status_hang`` makes ``/worker_get_status`` never answer; ``status_garbage`` makes it
    answer something that is not a status; ``stream_status`` is the HTTP status of streams.
    """

    model_names: list[str] = attrs.Factory(lambda: ["m"])
    speed: float = 1
    queue_length: int = 0
    tokens: int = 3
    token_delay: float = 0.0
    hang_after: int | None = None
    die_after: int | None = None
    split: bool = False
    status_hang: bool = False
    status_garbage: bool = False
    stream_status: int = 200
    #: hold the stream's response headers back until ``release`` (a busy worker queueing it)
    hold_headers: bool = False
    server: TestServer | None = None
    status_calls: int = 0
    stream_bodies: list[bytes] = attrs.Factory(list)
    #: set when a stream's client (the controller) went away before the stream finished
    upstream_gone: asyncio.Event = attrs.Factory(asyncio.Event)
    #: lets a test release a hanging stream or status probe
    release: asyncio.Event = attrs.Factory(asyncio.Event)
    #: set when a stream request has arrived
    stream_started: asyncio.Event = attrs.Factory(asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def status(self) -> dict[str, Any]:
        return {
            "model_names": self.model_names,
            "speed": self.speed,
            "queue_length": self.queue_length,
        }

    def message(self, i: int) -> bytes:
        text = " ".join(f"tok{n}" for n in range(i + 1))
        return json.dumps({"text": text, "error_code": 0}).encode() + b"\0"

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        self.status_calls += 1
        if self.status_hang:
            await self.release.wait()
        if self.status_garbage:
            return web.Response(text="<html>not json</html>")
        return web.json_response(self.status())

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        self.stream_bodies.append(await request.read())
        self.stream_started.set()
        if self.stream_status != 200:
            return web.Response(status=self.stream_status, text="worker error")
        if self.hold_headers:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.upstream_gone.set()
                raise
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for i in range(self.tokens):
                if self.hang_after is not None and i == self.hang_after:
                    await self.release.wait()
                if self.die_after is not None and i == self.die_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                data = self.message(i)
                if self.split:
                    await response.write(data[:5])
                    await response.write(data[5:])
                else:
                    await response.write(data)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.upstream_gone.set()
            raise
        return response

    async def start(self) -> FakeWorker:
        app = web.Application()
        app.router.add_post("/worker_get_status", self.handle_status)
        app.router.add_post("/worker_generate_stream", self.handle_stream)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()


MakeWorker = Callable[..., Awaitable[FakeWorker]]


@pytest.fixture
async def make_worker() -> AsyncIterator[MakeWorker]:
    """Factory for fake workers on loopback ports; all are stopped after the test."""
    workers: list[FakeWorker] = []

    async def make(**knobs: Any) -> FakeWorker:
        worker = FakeWorker(**knobs)
        workers.append(worker)
        return await worker.start()

    yield make
    for worker in workers:
        await worker.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


RunController = Callable[..., Awaitable[Controller]]


@pytest.fixture
async def run_controller() -> AsyncIterator[RunController]:
    """Factory for standalone controllers on free loopback ports; closed after the test."""
    controllers: list[Controller] = []

    async def run(config: ControllerConfig | None = None, **kwargs: Any) -> Controller:
        if config is None:
            config = ControllerConfig(host="127.0.0.1", port=0)
        controller = await Controller.serve(config, **kwargs)
        controllers.append(controller)
        return controller

    yield run
    for controller in controllers:
        await controller.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def register_body(worker: FakeWorker | str, *, status: bool = True, **extra: Any) -> dict[str, Any]:
    """A FastChat worker's registration request for ``worker``."""
    if isinstance(worker, str):
        body: dict[str, Any] = {"worker_name": worker, "check_heart_beat": True}
    else:
        body = {"worker_name": worker.url, "check_heart_beat": True}
        if status:
            body["worker_status"] = worker.status()
    body.update(extra)
    return body


def split_stream(raw: bytes) -> list[dict[str, Any]]:
    """Decode a NUL-framed stream the way FastChat's clients do."""
    return [json.loads(piece) for piece in raw.split(b"\0") if piece]
