"""Hierarchical mode, part 2: a child fc-controller that registers itself with its parent.

``fc-controller --parent-controller URL --advertise-address URL`` registers the child at the
parent as one worker (``check_heart_beat: true``, the sorted union of its live workers'
models, the sum of their speeds and queue lengths), heartbeats with its total queue
length, registers again when the parent forgets it or its models change, and unregisters
on SIGTERM. The first tests watch what the child sends to a recording fake parent; the
last ones run it under real parents, ours and FastChat's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .support import (
    FAKE_REPLY,
    MODEL,
    ControllerProc,
    Launcher,
    consistently,
    eventually,
    free_port,
    list_models,
    post_json,
    worker_address,
)

INTERVAL = 1


@pytest.fixture(autouse=True)
def _needs_parent_mode(parent_mode_available: bool) -> None:
    if not parent_mode_available:
        pytest.skip("this fc-controller has no --parent-controller option yet")


@attrs.define(eq=False)
class FakeParent:
    """A parent controller that records what a child sends it.

    With ``forget`` set it answers heartbeats ``exist: false``, as a restarted parent
    would, until the child registers again.
    """

    registrations: list[dict[str, Any]] = attrs.Factory(list)
    heartbeats: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    unregistrations: list[dict[str, Any]] = attrs.Factory(list)
    forget: bool = False
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _register(self, request: web.Request) -> web.Response:
        self.registrations.append(json.loads(await request.read()))
        self.forget = False
        return web.json_response(None)

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append((time.monotonic(), json.loads(await request.read())))
        return web.json_response({"exist": not self.forget})

    async def _unregister(self, request: web.Request) -> web.Response:
        self.unregistrations.append(json.loads(await request.read()))
        return web.json_response({"removed": True})

    async def start(self) -> FakeParent:
        app = web.Application()
        app.router.add_post("/register_worker", self._register)
        app.router.add_post("/receive_heart_beat", self._heartbeat)
        app.router.add_post("/unregister_worker", self._unregister)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


@attrs.define(eq=False)
class StatusWorker:
    """A worker that only answers /worker_get_status, with the status it is given."""

    status: dict[str, Any]
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status)

    async def start(self) -> StatusWorker:
        app = web.Application()
        app.router.add_post("/worker_get_status", self._status)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    def registration(self) -> dict[str, Any]:
        return {"worker_name": self.url, "check_heart_beat": False, "worker_status": self.status}


@pytest.fixture
async def fake_parent() -> AsyncIterator[FakeParent]:
    parent = await FakeParent().start()
    try:
        yield parent
    finally:
        await parent.close()


@pytest.fixture
async def status_workers() -> AsyncIterator[list[StatusWorker]]:
    """Two workers: models {a, b} at speed 1 with 2 queued; {a, c} at speed 2 with 3 queued."""
    workers = [
        StatusWorker({"model_names": ["b-model", "a-model"], "speed": 1, "queue_length": 2}),
        StatusWorker({"model_names": ["c-model", "a-model"], "speed": 2, "queue_length": 3}),
    ]
    for worker in workers:
        await worker.start()
    try:
        yield workers
    finally:
        for worker in workers:
            if worker.server is not None:
                await worker.server.close()


async def start_child(launcher: Launcher, parent: str, *extra: str) -> ControllerProc:
    """A child fc-controller told to register with ``parent`` (started off the event loop,
    which may be serving a fake parent)."""
    port = free_port()
    args = [
        "--parent-controller",
        parent,
        "--advertise-address",
        f"http://127.0.0.1:{port}",
        "--parent-heart-beat-interval",
        str(INTERVAL),
        *extra,
    ]
    return await asyncio.to_thread(launcher.controller, "fc", port=port, args=args)


async def register_at(http: aiohttp.ClientSession, child: ControllerProc, body: Any) -> None:
    status, answer = await post_json(http, f"{child.url}/register_worker", body)
    assert (status, answer) == (200, None)


def expected_status(*workers: StatusWorker) -> dict[str, Any]:
    models = sorted({m for w in workers for m in w.status["model_names"]})
    return {
        "model_names": models,
        "speed": sum(w.status["speed"] for w in workers),
        "queue_length": sum(w.status["queue_length"] for w in workers),
    }


async def registered_with(
    parent: FakeParent, child: ControllerProc, status: dict[str, Any]
) -> float:
    """Wait until the parent's latest registration from ``child`` carries ``status``."""

    async def latest_matches() -> bool:
        if not parent.registrations:
            return False
        body = parent.registrations[-1]
        return (
            body.get("worker_name") == child.url
            and body.get("check_heart_beat") is True
            and body.get("worker_status") == status
            and not body.get("multimodal", False)
        )

    return await eventually(latest_matches, INTERVAL + 5, f"the child registers with {status}")


async def test_child_registers_with_its_aggregate_status(
    launcher: Launcher,
    fake_parent: FakeParent,
    status_workers: list[StatusWorker],
    http: aiohttp.ClientSession,
) -> None:
    """The child registers as one worker: its models' sorted union, summed speed and queue."""
    child = await start_child(launcher, fake_parent.url)
    for worker in status_workers:
        await register_at(http, child, worker.registration())

    await registered_with(fake_parent, child, expected_status(*status_workers))


async def test_child_heartbeats_with_its_queue_length(
    launcher: Launcher,
    fake_parent: FakeParent,
    status_workers: list[StatusWorker],
    http: aiohttp.ClientSession,
) -> None:
    """The child heartbeats every interval with the sum of its workers' queue lengths."""
    child = await start_child(launcher, fake_parent.url)
    for worker in status_workers:
        await register_at(http, child, worker.registration())
    await registered_with(fake_parent, child, expected_status(*status_workers))
    seen = len(fake_parent.heartbeats)

    async def two_more() -> bool:
        return len(fake_parent.heartbeats) >= seen + 2

    await eventually(two_more, 3 * INTERVAL + 2, "two more heartbeats arrive")
    (first, one), (second, other) = fake_parent.heartbeats[-2:]
    assert one == other == {"worker_name": child.url, "queue_length": 5}
    assert 0.5 * INTERVAL < second - first < 2 * INTERVAL


async def test_child_registers_again_when_the_parent_forgets_it(
    launcher: Launcher,
    fake_parent: FakeParent,
    status_workers: list[StatusWorker],
    http: aiohttp.ClientSession,
) -> None:
    """A heartbeat answered exist: false makes the child register again, status included."""
    child = await start_child(launcher, fake_parent.url)
    await register_at(http, child, status_workers[0].registration())
    await registered_with(fake_parent, child, expected_status(status_workers[0]))
    count = len(fake_parent.registrations)

    fake_parent.forget = True

    async def registered_again() -> bool:
        return len(fake_parent.registrations) > count

    await eventually(registered_again, INTERVAL + 2, "the child registers again")
    await registered_with(fake_parent, child, expected_status(status_workers[0]))


async def test_child_registers_again_when_its_models_change(
    launcher: Launcher,
    fake_parent: FakeParent,
    status_workers: list[StatusWorker],
    http: aiohttp.ClientSession,
) -> None:
    """A worker joining or leaving the child changes its models: it registers the new set."""
    first, second = status_workers
    child = await start_child(launcher, fake_parent.url)
    await register_at(http, child, first.registration())
    await registered_with(fake_parent, child, expected_status(first))

    await register_at(http, child, second.registration())
    await registered_with(fake_parent, child, expected_status(first, second))

    status, answer = await post_json(
        http, f"{child.url}/unregister_worker", {"worker_name": second.url}
    )
    assert (status, answer) == (200, {"removed": True})
    await registered_with(fake_parent, child, expected_status(first))


async def test_child_unregisters_on_sigterm(
    launcher: Launcher,
    fake_parent: FakeParent,
    status_workers: list[StatusWorker],
    http: aiohttp.ClientSession,
) -> None:
    """On SIGTERM the child tells the parent it is leaving, then exits with status 0."""
    child = await start_child(launcher, fake_parent.url)
    await register_at(http, child, status_workers[0].registration())
    await registered_with(fake_parent, child, expected_status(status_workers[0]))

    status = await asyncio.to_thread(child.service.stop, signal.SIGTERM)

    assert status == 0
    assert fake_parent.unregistrations == [{"worker_name": child.url}]


async def test_child_under_a_real_parent(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """Under either parent: registered, kept alive, re-registered after a parent restart."""
    expiration = 2
    parent = launcher.controller(kind, expiration=expiration)
    child = await start_child(launcher, parent.url)
    launcher.worker(child.url)

    async def routed_to_child() -> bool:
        return await worker_address(http, parent.url, MODEL) == child.url

    await eventually(routed_to_child, INTERVAL + 5, "the parent routes to the child")
    api = launcher.api_server(parent.url)
    status, body = await post_json(
        http,
        f"{api.url}/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]},
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == FAKE_REPLY

    async def listed() -> bool:
        return await list_models(http, parent.url) == [MODEL]

    # The child's heartbeats keep it registered past the parent's expiration.
    await consistently(listed, expiration + 1, "the parent lists the child's model")

    await asyncio.to_thread(launcher.restart_controller, parent)
    await eventually(listed, INTERVAL + 5, "the child registers with the new parent")
    assert await worker_address(http, parent.url, MODEL) == child.url


async def test_parent_stops_routing_to_a_child_that_left(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A child stopped with SIGTERM: our parent drops it at once; FastChat's keeps it listed."""
    parent = launcher.controller(kind)
    child = await start_child(launcher, parent.url)
    launcher.worker(child.url)

    async def listed() -> bool:
        return await list_models(http, parent.url) == [MODEL]

    await eventually(listed, INTERVAL + 5, "the parent lists the child's model")

    status = await asyncio.to_thread(child.service.stop, signal.SIGTERM)

    # FastChat's controller has no /unregister_worker (404): the child exits cleanly anyway,
    # and the parent keeps routing to it until its heartbeat expires.
    assert status == 0
    expected = [] if kind == "fc" else [MODEL]
    assert await list_models(http, parent.url) == expected
