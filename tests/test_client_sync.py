"""The thread heartbeat client, driven from plain synchronous code.

The controllers (fake and real) run on an event loop in a background thread, so these test
bodies are ordinary blocking Python, like the threaded workers the client is for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controller import Controller, ControllerConfig
from controller.worker import (
    ENV_HEART_BEAT_INTERVAL,
    HeartbeatConfig,
    HeartbeatStats,
    SyncHeartbeatClient,
)

from .test_client import FakeController, free_port, make_config

T = TypeVar("T")
TIMEOUT = 5.0


class LoopThread:
    """An event loop running in a daemon thread, for hosting servers next to sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop's thread (for touching state owned by the loop)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def close(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


class ThreadClock:
    """Monotonic time that moves only when the test says so: a thread client's ``clock``
    and ``wait``. A wait returns once ``advance()`` has brought the time to its deadline,
    or at once when the client closes.
    """

    def __init__(self) -> None:
        self._now = 0.0
        # Guards the time and the list of waiting clients; never held with theirs.
        self._lock = threading.Condition()
        self._waiting: list[threading.Condition] = []

    def time(self) -> float:
        with self._lock:
            return self._now

    def wait(
        self, condition: threading.Condition, predicate: Callable[[], bool], timeout: float
    ) -> bool:
        with self._lock:
            deadline = self._now + timeout
            self._waiting.append(condition)
            self._lock.notify_all()
        try:
            while not predicate() and self.time() < deadline:
                condition.wait()
        finally:
            with self._lock:
                self._waiting.remove(condition)
        return predicate()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()

    def wait_waiting(self, count: int) -> bool:
        """Wait until ``count`` clients wait for the clock; ``False`` after TIMEOUT."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._waiting) >= count, TIMEOUT)


class Servers:
    """Fake and real controllers on the background loop; all stopped after the test."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.fakes: list[FakeController] = []
        self.controllers: list[Controller] = []

    def fake(self, *, start: bool = True, **knobs: Any) -> FakeController:
        fake = self.lt.call(lambda: FakeController(**knobs))
        self.fakes.append(fake)
        if start:
            self.lt.run(fake.start())
        return fake

    def controller(self, port: int = 0) -> Controller:
        async def serve() -> Controller:
            return await Controller.serve(ControllerConfig(host="127.0.0.1", port=port))

        controller = self.lt.run(serve())
        self.controllers.append(controller)
        return controller

    def wait(self, fake: FakeController, predicate: Callable[[], bool]) -> None:
        self.lt.run(fake.wait_until(predicate), TIMEOUT + 1)

    def close(self) -> None:
        for fake in self.fakes:
            self.lt.run(fake.stop())
        for controller in self.controllers:
            self.lt.run(controller.aclose())


@pytest.fixture
def servers() -> Iterator[Servers]:
    lt = LoopThread()
    servers = Servers(lt)
    try:
        yield servers
    finally:
        servers.close()
        lt.close()


MakeClient = Callable[..., SyncHeartbeatClient]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Factory for started thread clients; all are closed after the test."""
    clients: list[SyncHeartbeatClient] = []

    def make(
        config: HeartbeatConfig, queue_length: Any = None, **options: Any
    ) -> SyncHeartbeatClient:
        client = SyncHeartbeatClient(config, queue_length, **options)
        clients.append(client)
        client.start()
        return client

    yield make
    for client in clients:
        client.close()


def wait(
    client: SyncHeartbeatClient, predicate: Callable[[HeartbeatStats], bool]
) -> HeartbeatStats:
    stats = client.wait_until(predicate, TIMEOUT)
    assert stats is not None, f"condition not met in {TIMEOUT} s: {client.statistics()}"
    return stats


def worker_address(controller: Controller, model: str = "m") -> str:
    request = urllib.request.Request(
        f"{controller.url}/get_worker_address",
        data=json.dumps({"model": model}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        address: str = json.load(response)["address"]
        return address


# -- against a fake controller -------------------------------------------------------------


def test_registers_then_heartbeats(servers: Servers, make_client: MakeClient) -> None:
    """The thread registers with FastChat's body, then heartbeats with the queue length."""
    fake = servers.fake()
    client = make_client(make_config(fake.url, model_names=["a"]), lambda: 2)
    assert client.wait_registered(TIMEOUT)
    servers.wait(fake, lambda: len(fake.heartbeats) >= 2)
    assert fake.registrations == [
        {
            "worker_name": "http://127.0.0.1:9001",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["a"], "speed": 1, "queue_length": 2},
            "multimodal": False,
        }
    ]
    assert fake.heartbeats[0] == {"worker_name": "http://127.0.0.1:9001", "queue_length": 2}


def test_reregisters_when_the_controller_forgot_the_worker(
    servers: Servers, make_client: MakeClient
) -> None:
    """exist: false from the controller brings an immediate new registration."""
    fake = servers.fake()
    client = make_client(make_config(fake.url))
    wait(client, lambda s: s.heartbeats >= 1)
    servers.lt.call(fake.known.clear)
    wait(client, lambda s: s.registrations == 2 and s.registered)
    assert len(fake.registrations) == 2


def test_worker_started_before_its_controller(servers: Servers, make_client: MakeClient) -> None:
    """With no controller yet the thread retries; it registers once one listens."""
    fake = servers.fake(start=False, port=free_port())
    client = make_client(make_config(fake.url))
    stats = wait(client, lambda s: s.failures >= 3)
    assert stats.connected is False
    servers.lt.run(fake.start())
    assert client.wait_registered(TIMEOUT)
    assert len(fake.registrations) == 1


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_misbehaving_controller_is_retried_without_crashing(
    servers: Servers, make_client: MakeClient, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """500s and silence are retried with backoff, with one log line for the outage."""
    caplog.set_level(logging.INFO, logger="controller.worker")
    fake = servers.fake(mode=mode)
    client = make_client(make_config(fake.url, request_timeout=0.1))
    wait(client, lambda s: s.failures >= 4)

    def recover() -> None:
        fake.mode = "ok"
        fake.release.set()

    servers.lt.call(recover)
    assert client.wait_registered(TIMEOUT)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 1


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fc-heartbeat http://127.0.0.1:9001"]


def test_close_is_prompt_and_says_goodbye(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """close() wakes the thread from its 30 s wait, and tells the controller the worker left."""
    fake = servers.fake()
    client = SyncHeartbeatClient(make_config(fake.url, interval=30))
    with client:
        assert client.wait_registered(TIMEOUT)
        assert len(heartbeat_threads()) == 1
    # close() gives the thread about 2 s to end: if it slept out its interval it would
    # still be running, and close() would have warned that it left it behind.
    assert heartbeat_threads() == []
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert fake.unregistrations == [{"worker_name": "http://127.0.0.1:9001"}]
    assert client.statistics().closed


def test_close_never_fails_when_the_controller_is_gone(servers: Servers) -> None:
    """A goodbye to a controller that went away is logged, not raised."""
    fake = servers.fake()
    client = SyncHeartbeatClient(make_config(fake.url, unregister_timeout=0.2))
    client.start()
    assert client.wait_registered(TIMEOUT)
    servers.lt.run(fake.stop())
    client.close()
    client.close()  # idempotent
    assert fake.unregistrations == []


def test_refuses_an_async_queue_length() -> None:
    """A coroutine function cannot be called from the thread: TypeError up front."""

    async def queue_length() -> int:
        return 0

    with pytest.raises(TypeError, match="cannot await"):
        SyncHeartbeatClient(make_config("http://127.0.0.1:1"), queue_length)  # type: ignore[arg-type]


# -- against the real controller -----------------------------------------------------------


def test_real_controller_worker_started_first(servers: Servers, make_client: MakeClient) -> None:
    """A thread client started before the real controller is routable once it is up."""
    port = free_port()
    client = make_client(make_config(f"http://127.0.0.1:{port}"))
    wait(client, lambda s: s.failures >= 2)
    controller = servers.controller(port)
    assert client.wait_registered(TIMEOUT)
    assert worker_address(controller) == "http://127.0.0.1:9001"


def test_real_controller_restart_brings_workers_back_within_one_interval(
    servers: Servers, make_client: MakeClient
) -> None:
    """Restarting the real controller: every thread client is back within one interval."""
    controller = servers.controller()
    port = int(controller.url.rsplit(":", 1)[1])
    interval = 0.5
    clock = ThreadClock()
    clients = [
        make_client(
            make_config(
                controller.url, worker_address=f"http://127.0.0.1:{9001 + i}", interval=interval
            ),
            clock=clock.time,
            wait=clock.wait,
        )
        for i in range(3)
    ]
    for client in clients:
        assert client.wait_registered(TIMEOUT)
    assert clock.wait_waiting(len(clients))
    servers.lt.run(controller.aclose())
    restarted = servers.controller(port)
    # One interval passes and no more: every worker must be back without further waiting.
    clock.advance(interval)
    for client in clients:
        wait(client, lambda s: s.registrations == 2 and s.registered)
    assert sorted(w.name for w in restarted.registry) == [
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9002",
        "http://127.0.0.1:9003",
    ]


def test_real_controller_stops_routing_to_a_worker_that_left(servers: Servers) -> None:
    """A thread client that closes is unroutable at once."""
    controller = servers.controller()
    with SyncHeartbeatClient(make_config(controller.url, interval=30)) as client:
        assert client.wait_registered(TIMEOUT)
        assert worker_address(controller) == "http://127.0.0.1:9001"
    assert worker_address(controller) == ""


PLAIN_PROGRAM = """
import sys
from controller.worker import HeartbeatConfig, SyncHeartbeatClient

config = HeartbeatConfig.from_environ(
    controller_address=sys.argv[1], worker_address="http://127.0.0.1:9101", model_names=["plain"]
)
assert config.interval == 0.2, config.interval
with SyncHeartbeatClient(config, lambda: 1) as client:
    if not client.wait_registered(timeout=10):
        sys.exit(3)
    print("registered", flush=True)
    sys.stdin.readline()
"""


def test_plain_python_program(servers: Servers, tmp_path: Path) -> None:
    """A plain Python program using the thread client joins the real controller and leaves."""
    controller = servers.controller()
    script = tmp_path / "worker.py"
    script.write_text(PLAIN_PROGRAM)
    env = {**os.environ, ENV_HEART_BEAT_INTERVAL: "0.2"}
    with subprocess.Popen(
        [sys.executable, str(script), controller.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        try:
            assert process.stdout.readline() == "registered\n"
            assert worker_address(controller, "plain") == "http://127.0.0.1:9101"
            process.stdin.write("\n")
            process.stdin.flush()
            assert process.wait(TIMEOUT) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert worker_address(controller, "plain") == ""
