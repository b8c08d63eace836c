"""Limits that keep one busy controller serving everyone: the accept queue, the descriptor
limit, and one round of status probes shared by every /worker_get_status caller."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import resource
import shutil
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import ControllerConfig
from controller.worker.demo import DemoSettings, DemoWorker

from .conftest import (
    FakeClock,
    MakeWorker,
    RunController,
    SpawnController,
    post_ok,
    register_body,
)

STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}


def listen_queue(port: int) -> int:
    """The accept queue of the socket listening on ``port``, as ``ss`` shows it (its
    Send-Q column for a listening socket)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    queues = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert len(queues) == 1, out
    return queues.pop()


needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")


@needs_ss
async def test_the_controller_listens_with_the_backlog_asked_for(
    run_controller: RunController,
) -> None:
    """The listening socket's accept queue is --backlog (2048 unless told), not aiohttp's
    128 that made a burst of new clients wait out a SYN retransmit."""
    default = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
    small = await run_controller(ControllerConfig(host="127.0.0.1", port=0, backlog=300))
    assert listen_queue(int(default.url.rsplit(":", 1)[1])) == 2048
    assert listen_queue(int(small.url.rsplit(":", 1)[1])) == 300


@needs_ss
async def test_the_demo_worker_listens_with_its_backlog() -> None:
    """fc-demo-worker takes the same --backlog."""
    settings = DemoSettings(host="127.0.0.1", port=0, register=False, backlog=700)
    async with DemoWorker(settings) as worker:
        assert listen_queue(int(worker.url.rsplit(":", 1)[1])) == 700


async def test_the_command_raises_its_descriptor_limit_and_says_so(
    spawn_controller: SpawnController,
) -> None:
    """Started with a soft descriptor limit below the hard one, fc-controller raises it
    to the hard limit (its /proc limits show it) and logs the limit it runs with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard descriptor limit above 256, have {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        controller = await spawn_controller()  # inherits the lowered soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open(f"/proc/{controller.pid}/limits") as f:
        row = next(line for line in f if line.startswith("Max open files"))
    assert re.split(r"\s{2,}", row.strip())[1:3] == [str(hard), str(hard)]
    assert any(f"Descriptor limit raised from 256 to {hard}" in line for line in controller.lines)


async def test_concurrent_status_calls_share_one_round_of_probes(
    run_controller: RunController,
    make_worker: MakeWorker,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    """Forty clients asking /worker_get_status at once cost one probe per worker; the
    answer serves later callers for a second, unless a worker joins meanwhile."""
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    controller = await run_controller(config, clock=clock)
    workers = [await make_worker(model_names=[f"m{i}"], queue_length=i) for i in range(5)]
    for worker in workers:
        await post_ok(http, controller, "/register_worker", register_body(worker))

    answers = await asyncio.gather(
        *(post_ok(http, controller, "/worker_get_status") for _ in range(40))
    )
    expected = {"model_names": [f"m{i}" for i in range(5)], "speed": 5, "queue_length": 10}
    assert all(answer == expected for answer in answers)
    assert [w.status_calls for w in workers] == [1] * 5

    clock.advance(0.5)
    assert await post_ok(http, controller, "/worker_get_status") == expected
    assert [w.status_calls for w in workers] == [1] * 5

    clock.advance(0.6)
    await post_ok(http, controller, "/worker_get_status")
    assert [w.status_calls for w in workers] == [2] * 5

    late = await make_worker(model_names=["late"])
    await post_ok(http, controller, "/register_worker", register_body(late))
    answer = await post_ok(http, controller, "/worker_get_status")
    assert "late" in answer["model_names"]
    assert [w.status_calls for w in workers] == [3] * 5


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        pytest.param([f"m{i}" for i in range(4)], "at most 3 names", id="too-many"),
        pytest.param(["m" * 257], "at most 256 characters", id="too-long"),
        pytest.param(["evil\u202egpt"], "printable", id="bidi-override"),
        pytest.param(["two\nlines"], "printable", id="newline"),
        pytest.param(["ok", ""], "non-empty", id="empty"),
    ],
)
async def test_model_names_past_the_bounds_are_refused(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    names: list[str],
    problem: str,
) -> None:
    """A registration with more model names than --max-models-per-worker, a name over 256
    characters, or one with control or bidirectional-override characters gets a 400 naming
    the field, and registers nothing."""
    config = ControllerConfig(host="127.0.0.1", port=0, max_models_per_worker=3)
    controller = await run_controller(config)
    status = {"model_names": names, "speed": 1, "queue_length": 0}
    body = register_body("http://127.0.0.1:9", worker_status=status)
    async with http.post(f"{controller.url}/register_worker", json=body) as r:
        assert r.status == 400
        answer = await r.json()
    assert answer["field"] == "worker_status.model_names"
    assert problem in answer["message"]
    assert await post_ok(http, controller, "/list_models") == {"models": []}


async def test_a_status_answer_over_a_mebibyte_is_no_answer(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A worker whose /worker_get_status answer is over 1 MiB is not registered from it
    (nor kept by a refresh): the controller stops reading at the cap."""
    huge = json.dumps(
        {"model_names": ["m"], "speed": 1, "queue_length": 0, "junk": "x" * (2 << 20)}
    ).encode()

    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(body=huge, content_type="application/json")

    app = web.Application()
    app.router.add_post("/worker_get_status", status)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
        url = str(server.make_url("")).rstrip("/")
        await post_ok(http, controller, "/register_worker", register_body(url, status=False))
        assert await post_ok(http, controller, "/list_models") == {"models": []}
    finally:
        await server.close()


async def test_registrations_past_max_workers_get_503_and_change_nothing(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With --max-workers 2, a third worker gets 503 with Retry-After and a body naming
    the limit; the two registered re-register freely, and a place freed by a goodbye can
    be taken."""
    config = ControllerConfig(host="127.0.0.1", port=0, max_workers=2, load_poll_interval=0)
    controller = await run_controller(config)
    names = [f"http://127.0.0.1:{port}" for port in (9001, 9002, 9003)]
    for name in names[:2]:
        await post_ok(
            http, controller, "/register_worker", register_body(name, worker_status=STATUS)
        )
    third = register_body(names[2], worker_status=STATUS)
    async with http.post(f"{controller.url}/register_worker", json=third) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) > 0
        assert "--max-workers" in (await r.json())["message"]
    assert sorted(w.name for w in controller.registry) == names[:2]
    await post_ok(
        http, controller, "/register_worker", register_body(names[0], worker_status=STATUS)
    )
    await post_ok(http, controller, "/unregister_worker", {"worker_name": names[0]})
    await post_ok(http, controller, "/register_worker", third)
    assert sorted(w.name for w in controller.registry) == names[1:]


async def test_registrations_from_one_source_are_capped(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With --max-workers-per-source 2, a third registration from this host gets 503
    while another host (a socket bound to 127.0.0.2) still registers."""
    config = ControllerConfig(
        host="127.0.0.1", port=0, max_workers_per_source=2, load_poll_interval=0
    )
    controller = await run_controller(config)
    for port in (9001, 9002):
        body = register_body(f"http://127.0.0.1:{port}", worker_status=STATUS)
        await post_ok(http, controller, "/register_worker", body)
    third = register_body("http://127.0.0.1:9003", worker_status=STATUS)
    async with http.post(f"{controller.url}/register_worker", json=third) as r:
        assert r.status == 503
        assert "--max-workers-per-source" in (await r.json())["message"]
    other_host = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other_host) as elsewhere:
        async with elsewhere.post(f"{controller.url}/register_worker", json=third) as r:
            assert r.status == 200
    assert len(controller.registry) == 3


async def test_a_registration_with_many_long_names_logs_one_short_line(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A registration carrying 1,000 model names of 200 characters (200 KB) is logged as a
    line of a few hundred characters that says how many names it left out."""
    caplog.set_level(logging.INFO, logger="controller")
    controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
    names = [f"{i:04d}" + "m" * 196 for i in range(1000)]
    status = {"model_names": names, "speed": 1, "queue_length": 0}
    await post_ok(
        http,
        controller,
        "/register_worker",
        register_body("http://127.0.0.1:9", worker_status=status),
    )
    (line,) = [r.getMessage() for r in caplog.records if "Registered new worker" in r.getMessage()]
    assert "and 992 more" in line
    assert len(line) < 2000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def test_oversized_bodies_leave_no_memory_behind(
    spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    """After 100 bodies each a little past --max-body-size (4 MiB) are refused with 413,
    the controller's resident memory is within 50 MiB of where it started."""
    controller = await spawn_controller("--max-body-size", "4MiB")
    url = f"{controller.url}/worker_generate_stream"
    body = b'{"model": "m", "pad": "' + b"x" * (5 << 20) + b'"}'

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    async with http.post(url, data=pieces()) as r:  # warm up aiohttp's buffers
        assert r.status == 413
    before = rss_mib(controller.pid)
    for n in range(100):
        # Half with a length (refused unread), half chunked (read up to the limit).
        data = io.BytesIO(body) if n % 2 else pieces()
        async with http.post(url, data=data) as r:
            assert r.status == 413
    assert rss_mib(controller.pid) - before < 50
