"""X-Request-Id: taken from the client when well formed, else made; echoed in every answer,
passed on to the worker (streams, single-document calls, status probes), and on every log
line about the request."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig
from controller.credentials import Access, TokenTable
from controller.requestid import RequestIdFilter

from .conftest import RunController, split_stream

ID_RULE = re.compile(r"[A-Za-z0-9._-]{1,128}")


@attrs.define(eq=False)
class RecordingWorker:
    """A worker on a real loopback port that notes the X-Request-Id of every request."""

    seen: dict[str, list[str | None]] = attrs.Factory(dict)
    server: TestServer | None = None

    def _note(self, request: web.Request) -> None:
        self.seen.setdefault(request.path, []).append(request.headers.get("X-Request-Id"))

    async def status(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        return web.json_response({"model_names": ["m"], "speed": 1, "queue_length": 0})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"text": "hi", "error_code": 0}\0')
        await response.write_eof()
        return response

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        await request.read()
        return web.json_response({"text": "hi", "error_code": 0})

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def worker() -> AsyncIterator[RecordingWorker]:
    recording = RecordingWorker()
    app = web.Application()
    app.router.add_post("/worker_get_status", recording.status)
    app.router.add_post("/worker_generate_stream", recording.stream)
    app.router.add_post("/worker_generate", recording.generate)
    recording.server = TestServer(app, host="127.0.0.1")
    await recording.server.start_server()
    yield recording
    await recording.server.close()


Send = Callable[..., Awaitable[tuple[int, str, bytes]]]


@pytest.fixture
async def controller(run_controller: RunController, worker: RecordingWorker) -> Controller:
    """A controller with the recording worker registered (with its status: no probe)."""
    running = await run_controller()
    async with aiohttp.ClientSession() as http:
        body = {
            "worker_name": worker.url,
            "check_heart_beat": False,
            "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0},
        }
        async with http.post(f"{running.url}/register_worker", json=body) as r:
            assert r.status == 200
    return running


@pytest.fixture
async def send(controller: Controller) -> AsyncIterator[Send]:
    """POST a body to a path with an optional X-Request-Id; the status, the answer's
    X-Request-Id and its body."""
    async with aiohttp.ClientSession() as http:

        async def post(path: str, body: object, request_id: str | None) -> tuple[int, str, bytes]:
            headers = {"X-Request-Id": request_id} if request_id is not None else {}
            async with http.post(f"{controller.url}{path}", json=body, headers=headers) as r:
                return r.status, r.headers.get("X-Request-Id", ""), await r.read()

        yield post


RELAYED = [
    pytest.param("/worker_generate_stream", id="stream"),
    pytest.param("/worker_generate", id="single-document"),
]


@pytest.mark.parametrize("path", RELAYED)
@pytest.mark.parametrize("given", ["abc.DEF_123-x", "7", "a" * 128])
async def test_a_valid_id_is_kept_echoed_and_passed_to_the_worker(
    send: Send, worker: RecordingWorker, path: str, given: str
) -> None:
    """A well-formed X-Request-Id comes back in the answer and reaches the worker as sent."""
    status, echoed, body = await send(path, {"model": "m"}, given)
    assert status == 200
    assert b"hi" in body
    assert echoed == given
    assert worker.seen[path] == [given]


@pytest.mark.parametrize("path", RELAYED)
@pytest.mark.parametrize(
    "given",
    [
        pytest.param("a" * 129, id="too-long"),
        pytest.param("two words", id="space"),
        pytest.param("caf\u00e9", id="non-ascii"),
        pytest.param("x;y", id="punctuation"),
        pytest.param("", id="empty"),
        pytest.param(None, id="missing"),
    ],
)
async def test_an_invalid_or_missing_id_is_replaced(
    send: Send, worker: RecordingWorker, path: str, given: str | None
) -> None:
    """An id that breaks the rule (or none) is replaced by a fresh, well-formed one: the
    answer and the worker get the fresh one, never the client's text."""
    status, echoed, _ = await send(path, {"model": "m"}, given)
    assert status == 200
    assert ID_RULE.fullmatch(echoed)
    assert echoed != given
    assert worker.seen[path] == [echoed]


async def test_fresh_ids_differ_and_do_not_leak_into_the_next_request(
    controller: Controller, worker: RecordingWorker
) -> None:
    """On one kept-alive connection, a request without an id does not inherit the id of
    the request before it, and fresh ids are all different."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"{controller.url}/worker_generate"
        ids = []
        for headers in ({"X-Request-Id": "first"}, {}, {}, {}):
            async with http.post(url, json={"model": "m"}, headers=headers) as r:
                await r.read()
                ids.append(r.headers["X-Request-Id"])
    assert ids[0] == "first"
    assert len(set(ids)) == 4
    assert worker.seen["/worker_generate"] == ids


async def test_every_answer_carries_the_id(send: Send, controller: Controller) -> None:
    """Answers that relay nothing carry the id too: a dispatch, a 400, and the HTTP errors
    raised while reading a body (413, 415)."""
    status, echoed, _ = await send("/get_worker_address", {"model": "m"}, "dispatch-1")
    assert (status, echoed) == (200, "dispatch-1")
    status, echoed, _ = await send("/get_worker_address", {"modle": "m"}, "bad-1")
    assert (status, echoed) == (400, "bad-1")
    async with aiohttp.ClientSession() as http:
        url = f"{controller.url}/get_worker_address"
        headers = {"X-Request-Id": "large-1"}
        async with http.post(url, data=io.BytesIO(b"x" * (2 * 1024 * 1024)), headers=headers) as r:
            assert (r.status, r.headers["X-Request-Id"]) == (413, "large-1")
        headers = {"X-Request-Id": "gzip-1", "Content-Encoding": "gzip"}
        async with http.post(url, data=b"\x1f\x8b", headers=headers) as r:
            assert (r.status, r.headers["X-Request-Id"]) == (415, "gzip-1")


async def test_a_refused_caller_gets_the_id(run_controller: RunController) -> None:
    """A 401 from the access check carries the id, as any answer."""
    access = Access(client_tokens=TokenTable.from_env("a-client-token-0123456789", "test"))
    running = await run_controller(ControllerConfig(host="127.0.0.1", port=0, access=access))
    async with aiohttp.ClientSession() as http:
        headers = {"X-Request-Id": "who-1"}
        async with http.post(f"{running.url}/list_models", headers=headers) as r:
            assert (r.status, r.headers["X-Request-Id"]) == (401, "who-1")


async def test_a_registration_probe_carries_the_id(
    run_controller: RunController, worker: RecordingWorker
) -> None:
    """A registration without a status makes the controller ask the worker; that probe
    carries the registration's id."""
    running = await run_controller()
    async with aiohttp.ClientSession() as http:
        body = {"worker_name": worker.url, "check_heart_beat": True}
        headers = {"X-Request-Id": "register-1"}
        async with http.post(f"{running.url}/register_worker", json=body, headers=headers) as r:
            assert r.status == 200
    assert worker.seen["/worker_get_status"] == ["register-1"]


async def test_log_lines_about_a_request_show_its_id(
    send: Send, caplog: pytest.LogCaptureFixture
) -> None:
    """Every line logged while serving a request carries that request's id, and lines of
    different requests carry different ids."""
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.DEBUG, logger="controller"):
        await send("/get_worker_address", {"model": "m"}, "route-1")
        await send("/get_worker_address", {"model": "absent"}, "route-2")
        await send("/receive_heart_beat", {"worker_name": "http://nobody:1"}, "bad-2")
    about = {
        rid: [r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == rid]
        for rid in ("route-1", "route-2", "bad-2")
    }
    assert any("dispatch 'm'" in m for m in about["route-1"]), about
    assert any("dispatch 'absent'" in m for m in about["route-2"]), about
    assert any("bad request" in m for m in about["bad-2"]), about
    assert not any("absent" in m for m in about["route-1"])


async def test_a_stream_relayed_twice_keeps_one_id(
    run_controller: RunController, worker: RecordingWorker
) -> None:
    """A child controller relays the id it got from its parent (or client) on to the
    worker: one id across the whole tree."""
    child = await run_controller()
    parent = await run_controller()
    async with aiohttp.ClientSession() as http:
        for target, name in ((child, worker.url), (parent, child.url)):
            body = {
                "worker_name": name,
                "check_heart_beat": False,
                "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0},
            }
            async with http.post(f"{target.url}/register_worker", json=body) as r:
                assert r.status == 200
        headers = {"X-Request-Id": "tree-1"}
        url = f"{parent.url}/worker_generate_stream"
        async with http.post(url, json={"model": "m"}, headers=headers) as r:
            messages = split_stream(await r.read())
            assert r.headers["X-Request-Id"] == "tree-1"
    assert messages == [{"text": "hi", "error_code": 0}]
    assert worker.seen["/worker_generate_stream"] == ["tree-1"]
