"""Loop detection (issue 15): every relayed request carries this controller's Via entry,
and a request that already passed through it, or through more than 8 proxies, gets 508
before anything is relayed."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.server import Controller

from .conftest import RunController, post_ok, register_body, split_stream

STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}
RELAYS = ("/worker_generate_stream", "/worker_generate", "/model_details", "/count_token")


class ViaWorker:
    """A worker recording the Via header of every request it gets."""

    def __init__(self) -> None:
        self.via: list[list[str]] = []
        app = web.Application()
        app.router.add_post("/worker_get_status", self._status)
        app.router.add_post("/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(STATUS)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.via.append(request.headers.getall("Via", []))
        if request.path == "/worker_generate_stream":
            return web.Response(body=b'{"text": "hi", "error_code": 0}\0')
        return web.json_response({"text": "hi", "error_code": 0})

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def via_worker() -> AsyncIterator[ViaWorker]:
    """A Via-recording worker on loopback; closed after the test."""
    worker = ViaWorker()
    await worker.server.start_server()
    yield worker
    await worker.server.close()


async def register_as_worker(
    http: aiohttp.ClientSession, controller: Controller, name: str
) -> None:
    body = register_body(name, check_heart_beat=False, worker_status=STATUS)
    await post_ok(http, controller, "/register_worker", body)


async def test_relayed_requests_carry_this_controller_s_via_after_the_client_s(
    run_controller: RunController, http: aiohttp.ClientSession, via_worker: ViaWorker
) -> None:
    """Every relay adds `1.1 <instance id>` after the Via entries the client sent; two
    controllers have different ids."""
    controller = await run_controller()
    other = await run_controller()
    assert controller.relay.via.instance != other.relay.via.instance
    await register_as_worker(http, controller, via_worker.url)
    own = f"1.1 {controller.relay.via.instance}"
    for path in RELAYS:
        async with http.post(f"{controller.url}{path}", json={"model": "m"}) as r:
            assert r.status == 200
        async with http.post(
            f"{controller.url}{path}", json={"model": "m"}, headers={"Via": "1.0 gateway"}
        ) as r:
            assert r.status == 200
    assert via_worker.via == [[own], [f"1.0 gateway, {own}"]] * len(RELAYS)


@pytest.mark.parametrize("path", RELAYS)
async def test_a_request_that_passed_here_or_through_nine_proxies_gets_508(
    run_controller: RunController, http: aiohttp.ClientSession, via_worker: ViaWorker, path: str
) -> None:
    """A request already carrying this controller's id, or 9 Via entries, is refused
    with 508 and a JSON body (streams included), and the worker never sees it; 8 pass."""
    controller = await run_controller()
    await register_as_worker(http, controller, via_worker.url)
    own = f"1.1 {controller.relay.via.instance}"
    nine = ", ".join(f"1.1 proxy{i}" for i in range(9))
    for via in (f"1.0 a, {own}", nine, [own], ["1.1 p1, 1.1 p2", "1.1 p3, " * 6 + "1.1 p4"]):
        headers = [("Via", v) for v in ([via] if isinstance(via, str) else via)]
        async with http.post(f"{controller.url}{path}", json={"model": "m"}, headers=headers) as r:
            assert r.status == 508, via
            body = json.loads(await r.read())
        assert body["error"] == "loop_detected"
    assert via_worker.via == []
    eight = ", ".join(f"1.1 proxy{i}" for i in range(8))
    async with http.post(
        f"{controller.url}{path}", json={"model": "m"}, headers={"Via": eight}
    ) as r:
        assert r.status == 200
    assert via_worker.via == [[f"{eight}, {own}"]]


async def test_two_controllers_registered_at_each_other_stop_at_the_first_repeat(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A and B registered as each other's worker: a stream to A goes to B, back to A,
    and A refuses it there (once), so the client gets an in-band error instead of
    hundreds of nested hops; the same for a single-document call."""
    a = await run_controller()
    b = await run_controller()
    await register_as_worker(http, a, b.url)
    await register_as_worker(http, b, a.url)
    caplog.set_level(logging.DEBUG, logger="controller.edge.handlers")
    async with http.post(f"{a.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert r.status == 200
        messages = split_stream(await r.read())
    assert [m["error_code"] for m in messages] == [50006]
    refusals = [r for r in caplog.records if "already passed through" in r.getMessage()]
    assert len(refusals) == 1
    assert a.relay.via.instance in refusals[0].getMessage()
    async with http.post(f"{b.url}/count_token", json={"model": "m"}) as r:
        await r.read()
    refusals = [r for r in caplog.records if "already passed through" in r.getMessage()]
    assert len(refusals) in (1, 2)  # B may have ejected A after the first failure
