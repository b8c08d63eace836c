"""GET /api/workers, /api/models and /status over HTTP: what each shows of the workers,
how the states follow heartbeats and failures, bad query parameters, the client role, and
the bound on how much work a large registry costs the loop at once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import controller.edge.status as status_module
from controller import Controller, ControllerConfig, WorkerInfo
from controller.credentials import Access, TokenTable, parse_networks
from controller.decisions import overview
from controller.edge.status import StatusRoutes

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register, register_body

CLIENT_TOKEN = "client-token-0123456789abcdef"


def config(**overrides: Any) -> ControllerConfig:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "load_poll_interval": 0}
    return ControllerConfig(**{**settings, **overrides})


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "application/json"
        assert r.headers["Cache-Control"] == "no-store"
        return json.loads(await r.read())


async def workers_by_name(
    http: aiohttp.ClientSession, controller: Controller, query: str = ""
) -> dict[str, dict[str, Any]]:
    document = await get_json(http, f"{controller.url}/api/workers{query}")
    return {w["name"]: w for w in document["workers"]}


async def test_api_workers_and_models_show_what_the_workers_registered(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Each registered worker is listed with its models, speed, reported queue and state;
    /api/models sums them per model; both name the controller and its dispatch method."""
    controller = await run_controller(config())
    a = await make_worker(model_names=["m", "n"], speed=2, queue_length=3)
    b = await make_worker(model_names=["m"], speed=1)
    await register(http, controller, a, b)

    document = await get_json(http, f"{controller.url}/api/workers")
    assert document["controller"]["dispatch_method"] == "least_time"
    assert document["controller"]["heart_beat_expiration"] == 90
    assert [w["name"] for w in document["workers"]] == [a.url, b.url]
    first = document["workers"][0]
    assert first["models"] == ["m", "n"]
    assert first["speed"] == 2
    assert first["reported_queue_length"] == 3
    assert first["queue_estimate"] == 3
    assert (first["state"], first["in_flight"], first["failures_in_a_row"]) == ("healthy", 0, 0)
    assert (first["expires"], first["ejected_for"], first["last_failure_age"]) == (True, 0, None)

    models = await get_json(http, f"{controller.url}/api/models")
    assert models["models"] == [
        {
            "name": "m",
            "workers": 2,
            "healthy": 2,
            "expiring": 0,
            "ejected": 0,
            "queue_estimate": 3,
            "in_flight": 0,
            "speed": 3,
        },
        {
            "name": "n",
            "workers": 1,
            "healthy": 1,
            "expiring": 0,
            "ejected": 0,
            "queue_estimate": 3,
            "in_flight": 0,
            "speed": 2,
        },
    ]

    only_n = await workers_by_name(http, controller, "?model=n")
    assert list(only_n) == [a.url]
    assert await workers_by_name(http, controller, "?model=nobody") == {}


async def test_a_late_heartbeat_shows_expiring_and_a_heartbeat_makes_it_healthy(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Silent for more than two thirds of the expiration: "expiring", with the heartbeat's
    age; a heartbeat makes it healthy again; past the expiration it is gone."""
    clock = FakeClock()
    controller = await run_controller(config(heart_beat_expiration=90), clock=clock)
    worker = await make_worker()
    manual = await make_worker(model_names=["m"])
    await register(http, controller, worker)
    await post_ok(
        http, controller, "/register_worker", register_body(manual, check_heart_beat=False)
    )

    clock.advance(59)
    shown = await workers_by_name(http, controller)
    assert shown[worker.url]["state"] == "healthy"
    assert shown[worker.url]["heartbeat_age"] == 59

    clock.advance(2)
    shown = await workers_by_name(http, controller)
    assert shown[worker.url]["state"] == "expiring"
    assert shown[worker.url]["heartbeat_age"] == 61
    # A registration without heartbeats never expires, however old.
    assert (shown[manual.url]["state"], shown[manual.url]["expires"]) == ("healthy", False)

    await post_ok(
        http, controller, "/receive_heart_beat", {"worker_name": worker.url, "queue_length": 0}
    )
    shown = await workers_by_name(http, controller)
    assert (shown[worker.url]["state"], shown[worker.url]["heartbeat_age"]) == ("healthy", 0)

    clock.advance(91)
    assert list(await workers_by_name(http, controller)) == [manual.url]


async def test_a_failed_relay_shows_ejected_with_its_failures(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker whose relay failed is "ejected" for the ejection's time, with one failure
    in a row and the failure's age; /api/models counts it as ejected."""
    clock = FakeClock()
    controller = await run_controller(config(), clock=clock)
    dead = await make_worker(crashed=True)
    await register(http, controller, dead)
    await post_ok(http, controller, "/worker_generate", {"model": "m"})

    clock.advance(1)
    shown = (await workers_by_name(http, controller))[dead.url]
    assert shown["state"] == "ejected"
    assert (shown["failures_in_a_row"], shown["last_failure_age"]) == (1, 1)
    assert shown["ejected_for"] == controller.config.ejection_base - 1
    models = await get_json(http, f"{controller.url}/api/models")
    assert [(m["name"], m["ejected"], m["healthy"]) for m in models["models"]] == [("m", 1, 0)]

    clock.advance(controller.config.ejection_base)
    shown = (await workers_by_name(http, controller))[dead.url]
    assert (shown["state"], shown["ejected_for"], shown["failures_in_a_row"]) == ("healthy", 0, 1)


async def test_in_flight_counts_the_streams_being_relayed_and_goes_back_to_zero(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """While a stream is being relayed its worker shows one in flight (and the model too);
    when it ends, zero."""
    controller = await run_controller(config())
    worker = await make_worker(tokens=3, hang_after=1)
    await register(http, controller, worker)

    async def generate() -> bytes:
        async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
            return await r.read()

    streaming = asyncio.create_task(generate())
    await worker.stream_started.wait()
    shown = (await workers_by_name(http, controller))[worker.url]
    assert (shown["in_flight"], shown["queue_estimate"]) == (1, 1)
    models = await get_json(http, f"{controller.url}/api/models")
    assert models["models"][0]["in_flight"] == 1

    worker.release.set()
    assert (await streaming).count(b"\0") == 3
    shown = (await workers_by_name(http, controller))[worker.url]
    assert (shown["in_flight"], shown["queue_estimate"]) == (0, 0)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/status?rows=abc", "rows"),
        ("/status?rows=0", "rows"),
        ("/status?rows=%C2%B2", "rows"),
        ("/status?refresh=-1", "refresh"),
        ("/status?refresh=99999999999", "refresh"),
        ("/status?model=", "model"),
        ("/api/workers?model=", "model"),
    ],
)
async def test_a_bad_query_parameter_gets_400_naming_it(
    run_controller: RunController, http: aiohttp.ClientSession, path: str, field: str
) -> None:
    """A query parameter that is not what the page takes: 400 with a JSON body naming it."""
    controller = await run_controller(config())
    async with http.get(f"{controller.url}{path}") as r:
        assert r.status == 400
        body = json.loads(await r.read())
    assert body["field"] == field


@pytest.mark.parametrize("path", ["/status", "/api/workers", "/api/models"])
async def test_the_views_belong_to_the_client_role(
    run_controller: RunController, http: aiohttp.ClientSession, path: str
) -> None:
    """With client tokens, the views answer 401 without a token and 200 with one; a
    trusted client network needs none."""
    tokens = TokenTable.from_lines([f"ops:{CLIENT_TOKEN}"], "test")
    closed = await run_controller(config(access=Access(client_tokens=tokens)))
    async with http.get(f"{closed.url}{path}") as r:
        assert r.status == 401
        assert json.loads(await r.read())["role"] == "client"
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with http.get(f"{closed.url}{path}", headers=headers) as r:
        assert r.status == 200

    loopback = parse_networks(["127.0.0.0/8"], "test")
    access = Access(client_tokens=tokens, trust_clients_from=loopback)
    trusting = await run_controller(config(access=access))
    async with http.get(f"{trusting.url}{path}") as r:
        assert r.status == 200


async def test_the_page_escapes_worker_strings_and_allows_only_its_own_style(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A model name holding markup reaches the page escaped, and the page's policy allows
    nothing but the one stylesheet it carries (matched by its hash)."""
    controller = await run_controller(config())
    hostile = "<script>alert(1)</script>&\"'"
    worker = await make_worker(model_names=[hostile])
    await register(http, controller, worker)
    async with http.get(f"{controller.url}/status") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        policy = r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        page = await r.text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in page
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert directives["style-src"] == f"'sha256-{digest}'"
    assert re.search(r'<meta http-equiv="refresh" content="5">', page)


async def test_the_page_caps_its_rows_and_says_how_many_it_left_out(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With ?rows=10 and 25 workers, ten worker rows and a line saying 15 more; ?model=
    narrows the page to one model's workers; ?refresh=0 drops the refresh."""
    controller = await run_controller(config())
    for i in range(25):
        name = f"http://127.0.0.1:{30000 + i}"
        status = {"model_names": [f"m{i % 2}"], "speed": 1, "queue_length": 0}
        await post_ok(
            http, controller, "/register_worker", register_body(name, worker_status=status)
        )
    async with http.get(f"{controller.url}/status?rows=10&refresh=0") as r:
        page = await r.text()
    assert page.count('<tr class="healthy"') == 10
    assert "15 more worker rows not shown" in page
    assert "http-equiv" not in page
    async with http.get(f"{controller.url}/status?model=m1") as r:
        page = await r.text()
    assert page.count('<tr class="healthy"') == 12
    assert "12 workers serving <code>m1</code>, 1 model" in page


async def test_an_empty_registry_shows_how_workers_join(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With no worker the page says none is registered and how one registers; the JSON
    views are empty lists."""
    controller = await run_controller(config())
    async with http.get(f"{controller.url}/status") as r:
        page = await r.text()
    assert "No workers are registered" in page
    assert "fc-demo-worker" in page
    assert (await get_json(http, f"{controller.url}/api/workers"))["workers"] == []
    assert (await get_json(http, f"{controller.url}/api/models"))["models"] == []


@pytest.mark.parametrize("path", ["/api/workers", "/api/models", "/status?rows=2000"])
async def test_a_large_registry_is_viewed_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """With 1,050 workers and slices of 100, the handler yields to the loop at least
    every 100 worker views (and 100 page rows), and the answer still holds every worker."""
    controller = Controller(ControllerConfig())
    for i in range(1050):
        info = WorkerInfo(f"http://10.0.{i // 250}.{i % 250}:21002", (f"m{i % 7}",), 1.0, True)
        controller.registry.register(info, 0)
    viewed = 0
    real_view_of = overview.view_of

    def counting_view_of(*args: Any) -> Any:
        nonlocal viewed
        viewed += 1
        return real_view_of(*args)

    monkeypatch.setattr(status_module, "view_of", counting_view_of)
    seen_at_pauses: list[int] = []

    async def pause() -> None:
        seen_at_pauses.append(viewed)
        await asyncio.sleep(0)

    routes = StatusRoutes(controller.router, slice_size=100, pause=pause)
    handler = routes.routes()[path.partition("?")[0]]
    response = await handler(make_mocked_request("GET", path))
    assert isinstance(response, web.Response)
    assert response.status == 200
    steps = [b - a for a, b in zip([0, *seen_at_pauses], [*seen_at_pauses, viewed], strict=True)]
    assert viewed == 1050
    assert max(steps) <= 100
    body = response.body
    assert isinstance(body, bytes)
    if path == "/api/workers":
        assert len(json.loads(body)["workers"]) == 1050
    elif path == "/api/models":
        assert sum(m["workers"] for m in json.loads(body)["models"]) == 1050
    else:
        # 1,050 worker rows and the models' rows, in slices of 100 parts after the views.
        assert body.decode().count('<tr class="healthy"') == 1050
        assert len(seen_at_pauses) >= 10 + 1050 // 100
