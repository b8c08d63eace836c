"""The asyncio heartbeat client, against fake controllers and the real one on loopback ports."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig
from controller.worker import (
    ENV_HEART_BEAT_INTERVAL,
    Backoff,
    ConcurrencyLimiter,
    HeartbeatClient,
    HeartbeatConfig,
    HeartbeatStats,
)

TIMEOUT = 5.0
INTERVAL = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_config(controller_url: str, **overrides: Any) -> HeartbeatConfig:
    """A config with test-sized times: beats every 0.2 s, retries within 50 ms."""
    settings: dict[str, Any] = {
        "controller_address": controller_url,
        "worker_address": "http://127.0.0.1:9001",
        "model_names": ["m"],
        "interval": INTERVAL,
        "request_timeout": 0.5,
        "unregister_timeout": 0.5,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
    }
    settings.update(overrides)
    return HeartbeatConfig(**settings)


class FakeClock:
    """Monotonic time that moves only when the test says so: a client's ``clock`` and ``sleep``.

    ``sleep`` returns once ``advance()`` has brought the time to its deadline. With
    ``autojump`` it jumps there at once instead, so time passes only while code sleeps.
    """

    def __init__(self, *, autojump: bool = False) -> None:
        self.now = 0.0
        self.autojump = autojump
        #: sleeps waiting for the clock to move
        self.sleeping = 0
        self._changed = asyncio.Event()

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        deadline = self.now + delay
        if self.autojump:
            self.now = max(self.now, deadline)
            await asyncio.sleep(0)  # a real sleep lets other tasks run; so must this one
            return
        self.sleeping += 1
        self._notify()
        try:
            while self.now < deadline:
                await self._changed.wait()
        finally:
            self.sleeping -= 1

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._notify()

    async def wait_sleeping(self, count: int = 1) -> None:
        """Wait until ``count`` sleeps wait for the clock (so advancing it wakes them)."""
        async with asyncio.timeout(TIMEOUT):
            while self.sleeping < count:
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


@attrs.define(eq=False)
class FakeController:
    """A controller stand-in on a real loopback port that records what workers send.

    ``mode`` is how it answers registrations and heartbeats: ``ok``, ``error`` (HTTP 500),
    ``garbage`` (200 with HTML) or ``hang`` (no answer until released). ``restart()``
    brings it back on the same port with no memory of any worker, as a restarted
    controller would. ``response_delay`` slows every answer down, by ``sleep``; heartbeats
    arrive at the times of ``clock`` (tests pass a ``FakeClock``'s).
    """

    port: int = 0
    mode: str = "ok"
    unregister_mode: str = "ok"
    response_delay: float = 0.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    registrations: list[dict[str, Any]] = attrs.Factory(list)
    heartbeats: list[dict[str, Any]] = attrs.Factory(list)
    heartbeat_times: list[float] = attrs.Factory(list)
    unregistrations: list[dict[str, Any]] = attrs.Factory(list)
    known: set[str] = attrs.Factory(set)
    server: TestServer | None = None
    release: asyncio.Event = attrs.Factory(asyncio.Event)
    #: set when an /unregister_worker request arrives, before it is answered
    unregister_arrived: asyncio.Event = attrs.Factory(asyncio.Event)
    _changed: asyncio.Event = attrs.Factory(asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                await self._changed.wait()

    async def _misbehave(self, mode: str) -> web.Response | None:
        if self.response_delay:
            await self.sleep(self.response_delay)
        if mode == "error":
            return web.Response(status=500, text="Internal Server Error")
        if mode == "garbage":
            return web.Response(text="<html>a proxy error page</html>")
        if mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        return None

    async def register(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (bad := await self._misbehave(self.mode)) is not None:
            return bad
        self.registrations.append(body)
        self.known.add(body["worker_name"])
        self._notify()
        return web.json_response(None)

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.heartbeat_times.append(self.clock())
        if (bad := await self._misbehave(self.mode)) is not None:
            return bad
        self.heartbeats.append(body)
        self._notify()
        return web.json_response({"exist": body["worker_name"] in self.known})

    async def unregister(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.unregister_arrived.set()
        if (bad := await self._misbehave(self.unregister_mode)) is not None:
            return bad
        self.unregistrations.append(body)
        removed = body["worker_name"] in self.known
        self.known.discard(body["worker_name"])
        self._notify()
        return web.json_response({"removed": removed})

    async def start(self) -> FakeController:
        app = web.Application()
        app.router.add_post("/register_worker", self.register)
        app.router.add_post("/receive_heart_beat", self.heartbeat)
        app.router.add_post("/unregister_worker", self.unregister)
        self.release = asyncio.Event()
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()
        assert self.server.port is not None
        self.port = self.server.port
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def restart(self) -> None:
        await self.stop()
        self.known.clear()
        await self.start()


MakeFake = Callable[..., Awaitable[FakeController]]


@pytest.fixture
async def make_fake() -> AsyncIterator[MakeFake]:
    """Factory for fake controllers; all are stopped after the test."""
    fakes: list[FakeController] = []

    async def make(*, start: bool = True, **knobs: Any) -> FakeController:
        fake = FakeController(**knobs)
        fakes.append(fake)
        return await fake.start() if start else fake

    yield make
    for fake in fakes:
        await fake.stop()


MakeClient = Callable[..., Awaitable[HeartbeatClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Factory for started heartbeat clients; all are closed after the test."""
    clients: list[HeartbeatClient] = []

    async def make(
        config: HeartbeatConfig, queue_length: Any = None, **options: Any
    ) -> HeartbeatClient:
        client = HeartbeatClient(config, queue_length, rng=random.Random(0), **options)
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.aclose()


async def wait(client: HeartbeatClient, predicate: Callable[[HeartbeatStats], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        await client.wait_until(predicate)


# -- configuration -------------------------------------------------------------------------


def test_interval_comes_from_the_environment_unless_given() -> None:
    """FASTCHAT_WORKER_HEART_BEAT_INTERVAL sets the interval; an explicit one wins."""
    base = {"controller_address": "http://c:1", "worker_address": "http://w:2", "model_names": "m"}
    env = {ENV_HEART_BEAT_INTERVAL: "7.5"}
    assert HeartbeatConfig.from_environ(env, **base).interval == 7.5
    assert HeartbeatConfig.from_environ(env, interval=3, **base).interval == 3
    assert HeartbeatConfig.from_environ({}, **base).interval == 45
    assert HeartbeatConfig.from_environ({ENV_HEART_BEAT_INTERVAL: ""}, **base).interval == 45


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_bad_environment_value_names_the_variable(value: str) -> None:
    """An unusable heartbeat interval in the environment is a ValueError naming it."""
    with pytest.raises(ValueError, match=ENV_HEART_BEAT_INTERVAL):
        HeartbeatConfig.from_environ(
            {ENV_HEART_BEAT_INTERVAL: value},
            controller_address="http://c:1",
            worker_address="http://w:2",
            model_names=["m"],
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("controller_address", "localhost:21001", "controller_address must be an http"),
        ("worker_address", "", "worker_address must be an http"),
        ("model_names", [], "model_names"),
        ("interval", 0, "interval must be a positive"),
        ("speed", -1, "speed"),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any, message: str) -> None:
    """Bad settings fail when the config is made, with a message naming the field."""
    with pytest.raises(ValueError, match=message):
        make_config("http://127.0.0.1:1", **{field: value})


def test_config_normalises_addresses_and_names() -> None:
    """Trailing slashes are dropped and a lone model name is not split into letters."""
    config = make_config("http://c:1/", worker_address="http://w:2/", model_names="vicuna")
    assert config.controller_address == "http://c:1"
    assert config.worker_address == "http://w:2"
    assert config.model_names == ("vicuna",)


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    """Delays double from base to cap, each drawn from the upper half, and reset on success."""
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    ceilings = [1, 2, 4, 8, 8, 8]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next_delay() <= ceiling
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1


def test_backoff_never_waits_longer_than_the_interval() -> None:
    """However high the cap, a retry comes within one heartbeat interval."""
    config = make_config("http://c:1", interval=10, backoff_cap=60)
    assert config.max_backoff == 10


# -- against a fake controller -------------------------------------------------------------


async def test_registers_with_fastchat_body(make_fake: MakeFake, make_client: MakeClient) -> None:
    """The registration carries FastChat's fields: URL, models, speed, queue, multimodal."""
    fake = await make_fake()
    client = await make_client(
        make_config(fake.url, model_names=["a", "b"], multimodal=True), lambda: 3
    )
    stats = await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    assert stats.registrations == 1
    assert fake.registrations == [
        {
            "worker_name": "http://127.0.0.1:9001",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["a", "b"], "speed": 1, "queue_length": 3},
            "multimodal": True,
        }
    ]


def _async_source() -> Callable[[], Awaitable[int]]:
    async def queue_length() -> int:
        return 4

    return queue_length


def _limiter_source() -> ConcurrencyLimiter:
    limiter = ConcurrencyLimiter(10)
    limiter._queued = 4  # as if four requests were in
    return limiter


@pytest.mark.parametrize(
    "source", [lambda: lambda: 4, _async_source, _limiter_source], ids=["sync", "async", "obj"]
)
async def test_heartbeats_report_the_queue_length(
    make_fake: MakeFake, make_client: MakeClient, source: Callable[[], Any]
) -> None:
    """Heartbeats carry the worker's queue length from a function, coroutine or limiter."""
    fake = await make_fake()
    await make_client(make_config(fake.url), source())
    await fake.wait_until(lambda: len(fake.heartbeats) >= 2)
    assert fake.heartbeats[:2] == [{"worker_name": "http://127.0.0.1:9001", "queue_length": 4}] * 2


async def test_interval_runs_from_the_start_of_each_beat(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """A slow answer does not stretch the interval: beats start one interval apart."""
    clock = FakeClock(autojump=True)
    fake = await make_fake(response_delay=0.2, clock=clock.time, sleep=clock.sleep)
    await make_client(make_config(fake.url, interval=0.3), clock=clock.time, sleep=clock.sleep)
    await fake.wait_until(lambda: len(fake.heartbeat_times) >= 4)
    gaps = [b - a for a, b in itertools.pairwise(fake.heartbeat_times[:4])]
    # From the start of each beat: 0.3 s; from the end of the previous one it would be 0.5 s.
    assert gaps == pytest.approx([0.3] * 3)


async def test_reregisters_when_the_controller_forgot_the_worker(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """A heartbeat answered with exist: false is followed at once by a new registration."""
    fake = await make_fake()
    client = await make_client(make_config(fake.url))
    await wait(client, lambda s: s.heartbeats >= 1)
    fake.known.clear()
    await wait(client, lambda s: s.registrations == 2 and s.registered)
    assert len(fake.registrations) == 2
    assert fake.known == {"http://127.0.0.1:9001"}


async def test_worker_started_before_its_controller_registers_when_it_comes_up(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """With no controller yet the client retries quietly; it registers once one listens."""
    fake = await make_fake(start=False, port=free_port())
    client = await make_client(make_config(fake.url))
    stats = await asyncio.wait_for(client.wait_until(lambda s: s.failures >= 3), TIMEOUT)
    assert not stats.registered
    assert stats.connected is False
    await fake.start()
    stats = await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    assert stats.connected is True
    assert stats.consecutive_failures == 0
    assert len(fake.registrations) == 1


async def test_restarted_controller_gets_the_worker_back_within_one_interval(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """After a controller restart the worker is registered again within one interval."""
    clock = FakeClock()
    fake = await make_fake()
    interval = 0.5
    client = await make_client(
        make_config(fake.url, interval=interval), clock=clock.time, sleep=clock.sleep
    )
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    await clock.wait_sleeping()
    await fake.restart()
    # One interval passes and no more: the worker must be back without further waiting.
    clock.advance(interval)
    await fake.wait_until(lambda: bool(fake.known))
    assert len(fake.registrations) == 2
    assert client.statistics().failures == 0


@pytest.mark.parametrize("mode", ["error", "garbage", "hang"])
async def test_misbehaving_controller_is_retried_without_crashing(
    make_fake: MakeFake,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """500s, non-JSON and silence are retried with backoff; one line when lost, one when back."""
    caplog.set_level(logging.INFO, logger="controller.worker")
    fake = await make_fake(mode=mode)
    client = await make_client(make_config(fake.url, request_timeout=0.1))
    stats = await asyncio.wait_for(client.wait_until(lambda s: s.failures >= 4), TIMEOUT)
    assert not stats.registered
    assert stats.last_error
    fake.mode = "ok"
    fake.release.set()
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    lost = [r for r in caplog.records if r.levelno == logging.WARNING]
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(lost) == 1
    assert len(back) == 1
    assert "retrying" in lost[0].getMessage()


async def test_lost_controller_is_retried_forever_then_found_again(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """A controller that goes away mid-life is retried until it is back, then re-registered."""
    fake = await make_fake()
    client = await make_client(make_config(fake.url))
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    await fake.stop()
    await wait(client, lambda s: s.consecutive_failures >= 5)
    await fake.restart()
    stats = await asyncio.wait_for(
        client.wait_until(lambda s: s.registrations == 2 and s.connected is True), TIMEOUT
    )
    assert stats.registered
    assert fake.known == {"http://127.0.0.1:9001"}


async def test_failing_queue_length_callable_does_not_stop_heartbeats(
    make_fake: MakeFake, make_client: MakeClient
) -> None:
    """If the worker's queue-length callable raises, the last good value is reported."""
    fake = await make_fake()
    values: list[int | Exception] = [2]

    def queue_length() -> int:
        value = values[-1]
        if isinstance(value, Exception):
            raise value
        return value

    client = await make_client(make_config(fake.url), queue_length)
    await wait(client, lambda s: s.heartbeats >= 1)
    values.append(RuntimeError("boom"))
    seen = len(fake.heartbeats)
    await fake.wait_until(lambda: len(fake.heartbeats) >= seen + 2)
    assert fake.heartbeats[-1]["queue_length"] == 2
    assert client.registered


async def test_close_tells_the_controller_the_worker_is_leaving(make_fake: MakeFake) -> None:
    """aclose() sends /unregister_worker with the worker's URL."""
    fake = await make_fake()
    async with HeartbeatClient(make_config(fake.url)) as client:
        await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    assert fake.unregistrations == [{"worker_name": "http://127.0.0.1:9001"}]
    assert fake.known == set()
    assert client.statistics().closed


@pytest.mark.parametrize(
    ("unregister_mode", "reason"),
    [("hang", "no answer within 0.2 s"), ("error", "HTTP 500"), ("down", "")],
)
async def test_close_never_fails_on_a_bad_goodbye(
    make_fake: MakeFake, caplog: pytest.LogCaptureFixture, unregister_mode: str, reason: str
) -> None:
    """A goodbye that hangs, fails or finds nobody is given up after unregister_timeout."""
    caplog.set_level(logging.INFO, logger="controller.worker")
    fake = await make_fake(unregister_mode=unregister_mode)
    client = HeartbeatClient(make_config(fake.url, unregister_timeout=0.2))
    await client.start()
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    if unregister_mode == "down":
        await fake.stop()
    # The fake's hang lasts until the test ends: aclose() returning at all shows the bound.
    await asyncio.wait_for(client.aclose(), TIMEOUT)
    assert fake.unregistrations == []
    assert client.statistics().closed
    gave_up = [r.getMessage() for r in caplog.records if "Could not tell" in r.getMessage()]
    assert len(gave_up) == 1
    assert reason in gave_up[0]


async def test_close_propagates_cancellation(make_fake: MakeFake) -> None:
    """Cancelling a task that is closing the client cancels it; nothing swallows it."""
    fake = await make_fake(unregister_mode="hang")
    client = HeartbeatClient(make_config(fake.url, unregister_timeout=30))
    await client.start()
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    closing = asyncio.create_task(client.aclose())
    await asyncio.wait_for(fake.unregister_arrived.wait(), TIMEOUT)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await client.aclose()  # idempotent; nothing left to do


async def test_cancellation_propagates_through_async_with(make_fake: MakeFake) -> None:
    """A worker task cancelled inside ``async with HeartbeatClient`` ends cancelled."""
    fake = await make_fake()
    registered = asyncio.Event()

    async def worker() -> None:
        async with HeartbeatClient(make_config(fake.url)) as client:
            await client.wait_registered()
            registered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(worker())
    await asyncio.wait_for(registered.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.unregistrations == [{"worker_name": "http://127.0.0.1:9001"}]


async def test_attach_ties_the_client_to_the_worker_application(make_fake: MakeFake) -> None:
    """attach(app) registers when the worker app starts and says goodbye when it stops."""
    fake = await make_fake()
    app = web.Application()
    client = HeartbeatClient(make_config(fake.url)).attach(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await asyncio.wait_for(client.wait_registered(), TIMEOUT)
        assert fake.known == {"http://127.0.0.1:9001"}
    finally:
        await server.close()
    assert fake.unregistrations == [{"worker_name": "http://127.0.0.1:9001"}]
    assert client.statistics().closed


async def test_shared_session_is_used_and_left_open(make_fake: MakeFake) -> None:
    """A session passed in is used for the calls and not closed by the client."""
    fake = await make_fake()
    async with aiohttp.ClientSession() as session:
        async with HeartbeatClient(make_config(fake.url), session=session) as client:
            await asyncio.wait_for(client.wait_registered(), TIMEOUT)
        assert not session.closed


async def test_lifecycle_misuse_is_reported(make_fake: MakeFake) -> None:
    """Starting twice is an error; waiting on a closed client raises instead of hanging."""
    fake = await make_fake()
    client = HeartbeatClient(make_config(fake.url))
    await client.start()
    with pytest.raises(RuntimeError, match="already started"):
        await client.start()
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    with pytest.raises(RuntimeError, match="already started"):
        await client.start()


async def test_closing_a_client_never_started_sends_nothing(make_fake: MakeFake) -> None:
    """A client closed before it started neither registers nor says goodbye."""
    fake = await make_fake()
    client = HeartbeatClient(make_config(fake.url))
    await client.aclose()
    assert fake.registrations == []
    assert fake.unregistrations == []


def loaded_modules(module: str) -> list[str]:
    """This package's modules and uvloop, as importing ``module`` leaves them."""
    code = (
        f"import json, sys, {module};"
        "ours = [m for m in sys.modules if m.startswith(('controller.', 'uvloop'))];"
        "print(json.dumps(sorted(ours)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize(
    "module",
    [
        "controller.worker",
        "controller.worker.demo",
        # the old paths, kept for users
        "controller.client",
        "controller.demo_worker",
    ],
)
def test_import_stays_on_the_worker_side(module: str) -> None:
    """Importing the worker side loads none of the server's modules, nor uvloop."""
    loaded = loaded_modules(module)
    assert module in loaded
    outside = [m for m in loaded if m != module and not m.startswith("controller.worker")]
    assert outside == []


def test_old_import_path_gives_the_same_objects() -> None:
    """``from controller.client import ...`` still works, with controller.worker's objects."""
    import controller.client as old
    import controller.worker as new

    assert old.__all__ == new.__all__
    assert [name for name in new.__all__ if getattr(old, name) is not getattr(new, name)] == []


# -- the concurrency limiter ---------------------------------------------------------------


async def test_limiter_counts_running_plus_waiting() -> None:
    """queue_length is running plus waiting; slots go to waiters in arrival order."""
    limiter = ConcurrencyLimiter(2)
    release = asyncio.Event()
    order: list[int] = []

    async def request(i: int) -> None:
        async with limiter:
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(request(i)) for i in range(5)]
    async with asyncio.timeout(TIMEOUT):
        # Polled: the limiter has no event to wait on.
        while limiter.queue_length < 5:
            await asyncio.sleep(0)
    assert (limiter.running, limiter.waiting, limiter.queue_length) == (2, 3, 5)
    assert limiter.locked()
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (limiter.running, limiter.waiting, limiter.queue_length) == (0, 0, 0)
    assert not limiter.locked()


async def test_limiter_forgets_a_cancelled_waiter() -> None:
    """A waiter cancelled before it gets a slot leaves the queue."""
    limiter = ConcurrencyLimiter(1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    async with asyncio.timeout(TIMEOUT):
        # Polled: the limiter has no event to wait on.
        while limiter.waiting < 1:
            await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.queue_length == 1
    limiter.release()
    assert limiter.queue_length == 0


def test_limiter_rejects_misuse() -> None:
    """A limit below 1 and a release without acquire are errors."""
    with pytest.raises(ValueError, match="positive integer"):
        ConcurrencyLimiter(0)
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        ConcurrencyLimiter(1).release()


# -- against the real controller -----------------------------------------------------------


@pytest.fixture
async def controllers() -> AsyncIterator[list[Controller]]:
    """Real controllers started by a test; all closed after it."""
    started: list[Controller] = []
    yield started
    for controller in started:
        await controller.aclose()


async def serve(controllers: list[Controller], port: int = 0) -> Controller:
    controller = await Controller.serve(ControllerConfig(host="127.0.0.1", port=port))
    controllers.append(controller)
    return controller


async def worker_address(controller: Controller, model: str = "m") -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{controller.url}/get_worker_address", json={"model": model}) as response,
    ):
        address: str = (await response.json())["address"]
        return address


async def test_real_controller_worker_started_first_registers_when_it_comes_up(
    controllers: list[Controller], make_client: MakeClient
) -> None:
    """A worker started before the real controller is routable soon after it comes up."""
    port = free_port()
    client = await make_client(make_config(f"http://127.0.0.1:{port}"))
    await wait(client, lambda s: s.failures >= 2)
    controller = await serve(controllers, port)
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    assert await worker_address(controller) == "http://127.0.0.1:9001"


async def test_real_controller_restart_brings_every_worker_back_within_one_interval(
    controllers: list[Controller], make_client: MakeClient
) -> None:
    """Killing and restarting the real controller: all workers are back within one interval."""
    controller = await serve(controllers)
    port = int(controller.url.rsplit(":", 1)[1])
    interval = 0.5
    clock = FakeClock()
    clients = [
        await make_client(
            make_config(
                controller.url, worker_address=f"http://127.0.0.1:{9001 + i}", interval=interval
            ),
            clock=clock.time,
            sleep=clock.sleep,
        )
        for i in range(3)
    ]
    for client in clients:
        await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    await clock.wait_sleeping(len(clients))
    await controller.aclose()
    restarted = await serve(controllers, port)
    # One interval passes and no more: every worker must be back without further waiting.
    clock.advance(interval)
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(
            *(c.wait_until(lambda s: s.registrations == 2 and s.registered) for c in clients)
        )
    assert restarted.registry.model_names(None) == ["m"]
    assert sorted(w.name for w in restarted.registry) == [
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9002",
        "http://127.0.0.1:9003",
    ]


async def test_real_controller_stops_routing_to_a_worker_that_left(
    controllers: list[Controller],
) -> None:
    """A worker that closes gracefully is unroutable at once, not after expiry."""
    controller = await serve(controllers)
    client = HeartbeatClient(make_config(controller.url, interval=30))
    await client.start()
    await asyncio.wait_for(client.wait_registered(), TIMEOUT)
    assert await worker_address(controller) == "http://127.0.0.1:9001"
    await client.aclose()
    assert await worker_address(controller) == ""
