"""Embedding: inside a host aiohttp application, or standalone with serve(); clean shutdown."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from controller import CONTROLLER_KEY, Controller, ControllerConfig, NotRunningError

from .conftest import MakeWorker, register_body, split_stream


def config() -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)


def controller_tasks() -> list[asyncio.Task[object]]:
    """The controller's background tasks still alive in this loop."""
    return [
        t for t in asyncio.all_tasks() if t.get_name().startswith("fc-controller") and not t.done()
    ]


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"host": "hello"})


async def test_host_application_serves_its_routes_and_the_controllers(
    http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """Controller.start(app) adds the controller to a host app served by the host's runner."""
    app = web.Application()
    app.router.add_get("/hello", hello)
    controller = await Controller.start(app, config())
    assert app[CONTROLLER_KEY] is controller
    assert not controller.running

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        assert controller.running
        assert controller_tasks()

        async with http.get(f"{base}/hello") as r:
            assert await r.json() == {"host": "hello"}
        async with http.get(f"{base}/test_connection") as r:
            assert await r.json() == "success"
        worker = await make_worker(tokens=2)
        async with http.post(f"{base}/register_worker", json=register_body(worker)) as r:
            assert r.status == 200
        async with http.post(f"{base}/worker_generate_stream", json={"model": "m"}) as r:
            assert [m["text"] for m in split_stream(await r.read())] == ["tok0", "tok0 tok1"]
    finally:
        await runner.cleanup()

    assert not controller.running
    assert controller_tasks() == []
    with pytest.raises(NotRunningError):
        _ = controller.session


async def test_start_refuses_an_application_that_already_runs() -> None:
    """Controller.start on a frozen (started) application fails with a clear error."""
    app = web.Application()
    app.freeze()
    with pytest.raises(RuntimeError, match="before the application starts"):
        await Controller.start(app, config())


async def test_serve_as_async_context_manager(http: aiohttp.ClientSession) -> None:
    """`async with Controller.serve(cfg) as c` serves inside the block and stops after it."""
    async with Controller.serve(config()) as controller:
        url = controller.url
        assert controller.running
        async with http.get(f"{url}/test_connection") as r:
            assert await r.json() == "success"
    assert not controller.running
    assert controller_tasks() == []
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{url}/test_connection") as r:
            await r.read()


async def test_awaited_serve_and_idempotent_aclose(http: aiohttp.ClientSession) -> None:
    """`c = await Controller.serve(cfg)` serves until `await c.aclose()`; aclose is idempotent."""
    controller = await Controller.serve(config())
    url = controller.url
    assert url.startswith("http://127.0.0.1:")
    assert not url.endswith(":0")
    async with http.get(f"{url}/test_connection") as r:
        assert await r.json() == "success"

    await controller.aclose()
    await controller.aclose()

    assert not controller.running
    assert controller_tasks() == []
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{url}/test_connection") as r:
            await r.read()


async def test_serve_on_a_busy_port_fails_and_leaves_nothing_running() -> None:
    """serve() on a port already in use raises OSError and starts no background work."""
    async with Controller.serve(config()) as first:
        port = int(first.url.rsplit(":", 1)[1])
        busy = ControllerConfig(host="127.0.0.1", port=port, load_poll_interval=0)
        second = Controller.serve(busy)
        before = len(controller_tasks())
        with pytest.raises(OSError, match=r"(?i)in use"):
            await second
        assert len(controller_tasks()) == before
