"""Shared fixtures: real fake workers on loopback ports, and controllers to test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig

# What FastChat's clients expect in an in-band error (its SERVER_ERROR_MSG), written here
# rather than imported so that a change to the controller's text cannot pass unnoticed.
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
ERROR_50006 = json.dumps({"text": SERVER_ERROR_MSG, "error_code": 50006}).encode() + b"\0"


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
    after that many; ``split`` sends each message in two writes to exercise reassembly
    (``split_gap`` seconds apart);
    ``status_hang`` makes ``/worker_get_status`` never answer; ``status_garbage`` makes it
    answer something that is not a status; ``stream_status`` is the HTTP status of streams;
    ``drop_at_once`` closes the connection before sending anything, headers included.
    After :meth:`stop` it refuses connections (a worker that crashed) and keeps its ``url``.

    ``/model_details`` answers at once, as a FastChat worker does: the controller relays it
    without counting it as work, which :func:`queue_estimates` relies on.

    A stream request may override the stream knobs for itself alone with a ``fake`` object
    in its body, such as ``{"model": "m", "fake": {"die_after": 1}}``.
    """

    model_names: list[str] = attrs.Factory(lambda: ["m"])
    speed: float = 1
    queue_length: int = 0
    tokens: int = 3
    token_delay: float = 0.0
    hang_after: int | None = None
    die_after: int | None = None
    split: bool = False
    split_gap: float = 0.0
    status_hang: bool = False
    status_garbage: bool = False
    stream_status: int = 200
    #: hold the stream's response headers back until ``release`` (a busy worker queueing it)
    hold_headers: bool = False
    drop_at_once: bool = False
    server: TestServer | None = None
    #: the base URL while listening, and the one it had after :meth:`stop`
    _url: str | None = None
    #: streams being served right now (what a real worker reports as its queue length)
    active: int = 0
    #: ``loop.time()`` when ``upstream_gone`` was last set
    upstream_gone_at: float | None = None
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
        assert self._url is not None, "start() the worker first"
        return self._url

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

    async def handle_model_details(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"context_length": 4096})

    def knobs(self, body: bytes) -> StreamKnobs:
        """The stream knobs for one request: the worker's, with the body's ``fake`` applied."""
        knobs = StreamKnobs(
            tokens=self.tokens,
            token_delay=self.token_delay,
            hang_after=self.hang_after,
            die_after=self.die_after,
            split=self.split,
            split_gap=self.split_gap,
            stream_status=self.stream_status,
            hold_headers=self.hold_headers,
            drop_at_once=self.drop_at_once,
        )
        try:
            overrides = json.loads(body).get("fake")
        except (ValueError, AttributeError):
            overrides = None
        return attrs.evolve(knobs, **overrides) if isinstance(overrides, dict) else knobs

    def _gone(self) -> None:
        self.upstream_gone_at = asyncio.get_running_loop().time()
        self.upstream_gone.set()

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.stream_bodies.append(body)
        self.stream_started.set()
        self.active += 1
        try:
            return await self._stream(request, self.knobs(body))
        finally:
            self.active -= 1

    async def _stream(self, request: web.Request, k: StreamKnobs) -> web.StreamResponse:
        if k.stream_status != 200:
            return web.Response(status=k.stream_status, text="worker error")
        if k.drop_at_once:
            assert request.transport is not None
            request.transport.close()
            # Nothing can be sent any more; aiohttp drops this answer.
            return web.Response()
        if k.hold_headers:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self._gone()
                raise
        response = web.StreamResponse()
        try:
            await response.prepare(request)
            for i in range(k.tokens):
                if k.hang_after is not None and i == k.hang_after:
                    await self.release.wait()
                if k.die_after is not None and i == k.die_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if k.token_delay:
                    await asyncio.sleep(k.token_delay)
                data = self.message(i)
                if k.split:
                    await response.write(data[:5])
                    if k.split_gap:
                        await asyncio.sleep(k.split_gap)
                    await response.write(data[5:])
                else:
                    await response.write(data)
            await response.write_eof()
        except ConnectionResetError:
            # The controller went away: what a real worker sees, and no error of its own.
            self._gone()
        except asyncio.CancelledError:
            self._gone()
            raise
        return response

    async def start(self, port: int | None = None) -> FakeWorker:
        """Listen on a free loopback port, or on ``port`` (to come back after :meth:`stop`)."""
        # Takes what the controller may relay (--max-body-size), not aiohttp's 1 MiB.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/worker_get_status", self.handle_status)
        app.router.add_post("/worker_generate_stream", self.handle_stream)
        app.router.add_post("/model_details", self.handle_model_details)
        self.server = TestServer(app, host="127.0.0.1", port=port)
        await self.server.start_server()
        self._url = str(self.server.make_url("")).rstrip("/")
        return self

    async def stop(self) -> int:
        """Crash: drop every connection at once, stop listening; returns the port to reuse."""
        assert self.server is not None and self.server.port is not None
        assert self.server.runner is not None and self.server.runner.server is not None
        port = self.server.port
        for connection in list(self.server.runner.server.connections):
            connection.force_close()
        await self.server.close()
        return port

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()


@attrs.frozen(kw_only=True)
class StreamKnobs:
    """The knobs that shape one stream (see :class:`FakeWorker`)."""

    tokens: int
    token_delay: float
    hang_after: int | None
    die_after: int | None
    split: bool
    split_gap: float
    stream_status: int
    hold_headers: bool
    drop_at_once: bool


MakeWorker = Callable[..., Awaitable[FakeWorker]]


@pytest.fixture
async def make_worker() -> AsyncIterator[MakeWorker]:
    """Factory for fake workers on loopback ports; all are stopped after the test.

    Keywords are :class:`FakeWorker`'s knobs; ``crashed=True`` gives one that has already
    crashed (:meth:`FakeWorker.stop`), whose address refuses connections.
    """
    workers: list[FakeWorker] = []

    async def make(*, crashed: bool = False, **knobs: Any) -> FakeWorker:
        worker = FakeWorker(**knobs)
        workers.append(worker)
        await worker.start()
        if crashed:
            await worker.stop()
        return worker

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


_STARTED = re.compile(r"running on (https?://\S+)")


@attrs.define(eq=False)
class ControllerProcess:
    """A controller in a process of its own (``python -m controller``), on a loopback port.

    ``lines`` collects its stderr (the log) as it comes; :meth:`wait_for_line` waits for one.
    """

    process: asyncio.subprocess.Process
    url: str = ""
    lines: list[str] = attrs.Factory(list)
    _new_line: asyncio.Event = attrs.Factory(asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, *args: str, timeout: float = 20.0, prefix: tuple[str, ...] = ()
    ) -> ControllerProcess:
        """Start one; ``prefix`` is a command to run it under (such as ``prlimit ...``)."""
        process = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-m",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(process)
        self._reader = asyncio.create_task(self._read())
        try:
            line = await self.wait_for_line("running on", timeout)
        except BaseException:
            await self.kill()
            raise
        match = _STARTED.search(line)
        assert match is not None, line
        self.url = match.group(1)
        return self

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for_line(self, text: str, timeout: float = 10.0) -> str:
        """The first log line containing ``text``, waiting up to ``timeout`` seconds for it."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"exited before logging {text!r}: {self.lines[-20:]}")
                self._new_line.clear()
                await self._new_line.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit status."""
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        if self._reader is not None:
            await self._reader


SpawnController = Callable[..., Awaitable[ControllerProcess]]


@pytest.fixture
async def spawn_controller() -> AsyncIterator[SpawnController]:
    """Factory for controller processes (flags as arguments); all are killed and waited."""
    processes: list[ControllerProcess] = []

    async def spawn(*args: str, prefix: tuple[str, ...] = ()) -> ControllerProcess:
        process = await ControllerProcess.start(*args, prefix=prefix)
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        await process.kill()


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


async def wait_until(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float = 2.0
) -> None:
    """Wait for ``predicate`` to hold, checking every few milliseconds; fail after ``timeout``.

    For state with no event to wait on (a count in the registry, or an answer over HTTP
    when ``predicate`` is async); never a fixed sleep.
    """
    async with asyncio.timeout(timeout):
        while True:
            holds = predicate()
            if not isinstance(holds, bool):
                holds = await holds
            if holds:
                return
            await asyncio.sleep(0.005)


async def ask_test_connection(sock: socket.socket) -> bytes:
    """``GET /test_connection`` over a raw connected socket (made non-blocking here); the
    answer's bytes, up to FastChat's ``"success"`` body or the connection's end."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_sendall(sock, b"GET /test_connection HTTP/1.1\r\nHost: c\r\n\r\n")
    answer = b""
    while b'"success"' not in answer:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            break
        answer += data
    return answer


def split_stream(raw: bytes) -> list[dict[str, Any]]:
    """Decode a NUL-framed stream the way FastChat's clients do."""
    return [json.loads(piece) for piece in raw.split(b"\0") if piece]


async def post_ok(
    http: aiohttp.ClientSession, controller: Controller, path: str, body: Any = None
) -> Any:
    """POST ``body`` as JSON to ``path`` on ``controller``; asserts 200, returns the answer."""
    async with http.post(f"{controller.url}{path}", json=body) as r:
        assert r.status == 200, await r.text()
        return json.loads(await r.read())


async def register(
    http: aiohttp.ClientSession, controller: Controller, *workers: FakeWorker
) -> None:
    """Register ``workers`` with ``controller``, each with its status, as FastChat's do."""
    for worker in workers:
        await post_ok(http, controller, "/register_worker", register_body(worker))


async def stream(
    http: aiohttp.ClientSession, controller: Controller, body: Any = None
) -> list[dict[str, Any]]:
    """Stream a generation through ``controller`` (model ``m`` unless ``body`` says); the
    messages, decoded."""
    async with http.post(
        f"{controller.url}/worker_generate_stream", json={"model": "m"} if body is None else body
    ) as r:
        assert r.status == 200, await r.text()
        return split_stream(await r.read())


async def queue_estimates(
    http: aiohttp.ClientSession, controller: Controller, model: str = "m"
) -> dict[str, int]:
    """The controller's queue estimate of each worker serving ``model``, as it dispatches.

    Seen over the wire without adding to it: a ``/model_details`` call is relayed to a
    worker without being counted, and ``/dispatch_decisions`` shows the estimates that
    choice was made on. Needs workers that answer ``/model_details`` (as :class:`FakeWorker`
    does).
    """
    await post_ok(http, controller, "/model_details", {"model": model})
    async with http.get(f"{controller.url}/dispatch_decisions", params={"n": "1"}) as r:
        assert r.status == 200, await r.text()
        (decision,) = (await r.json())["decisions"]
    assert decision["model"] == model, decision
    return {c["worker"]: c["queue_length"] for c in decision["candidates"]}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return key, cert


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process's descriptor limit raised for a test holding thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
