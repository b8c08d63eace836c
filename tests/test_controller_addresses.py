"""A worker given several controller addresses (issue 18, the worker side): it registers
with the first that answers and moves on to the next when the one in use cannot be
reached, keeping its registration. The heartbeat helpers (asyncio and thread), the demo
worker and the parent link, against real controllers on loopback ports."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from controller import ConfigError, Controller, ControllerConfig
from controller.cli import load_config
from controller.credentials import Access, TokenTable
from controller.worker import HeartbeatClient, HeartbeatConfig, HeartbeatStats
from controller.worker.demo import DemoWorker
from controller.worker.demo.cli import load_settings

from .conftest import (
    MakeWorker,
    RunController,
    SpawnController,
    register_body,
    split_stream,
    wait_until,
)
from .test_client import FakeClock, FakeController, free_port, make_config
from .test_client_sync import Servers, servers  # noqa: F401  (the fixture)

TIMEOUT = 5.0
WORKER_TOKEN = "worker-token-0123456789abcdef"
WRONG_TOKEN = "wrong-token-0123456789abcdefgh"


async def stats_when(
    client: HeartbeatClient, predicate: Any, timeout: float = TIMEOUT
) -> HeartbeatStats:
    async with asyncio.timeout(timeout):
        return await client.wait_until(predicate)


async def address_at_url(url: str, model: str = "m") -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/get_worker_address", json={"model": model}) as response,
    ):
        address: str = (await response.json())["address"]
        return address


async def address_at(controller: Controller, model: str = "m") -> str:
    return await address_at_url(controller.url, model)


def switch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "moving to controller" in r.getMessage()
    ]


# -- configuration -------------------------------------------------------------------------


def test_one_address_still_works_and_a_list_is_split() -> None:
    """A single URL behaves as before; a comma-separated string or a sequence is split,
    trimmed and kept in order, and ``controller_address`` gives the list back."""
    one = make_config("http://c:1/")
    assert one.controller_addresses == ("http://c:1",)
    assert one.controller_address == "http://c:1"
    several = make_config(" http://a:1/, https://b:2 ")
    assert several.controller_addresses == ("http://a:1", "https://b:2")
    assert several.controller_address == "http://a:1,https://b:2"
    listed = HeartbeatConfig(
        controller_address=["http://a:1", "http://b:2"],
        worker_address="http://w:2",
        model_names="m",
    )
    assert listed.controller_addresses == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ("http://a:1,localhost:2", r"address 2 of 2 .* got 'localhost:2'"),
        ("http://a:1,,http://b:2", r"address 2 of 3 .* is empty"),
        ("http://a:1,", r"address 2 of 2 .* is empty"),
        ("http://a:1,http://a:1/", r"lists 'http://a:1' twice"),
    ],
)
def test_a_bad_address_in_the_list_is_named(addresses: str, message: str) -> None:
    """A list with a bad, empty or repeated entry fails when the config is made."""
    with pytest.raises(ValueError, match=message):
        make_config(addresses)


def test_the_command_lines_name_the_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    """--parent-controller (flag or variable), the embedder's config and fc-demo-worker's
    --controller-address all refuse a list with a bad entry, naming it."""
    with pytest.raises(SystemExit) as flag:
        load_config(["--parent-controller", "http://a:1,ftp://b:2"], environ={})
    assert flag.value.code == 2
    assert "--parent-controller" in (err := capsys.readouterr().err) and "'ftp://b:2'" in err
    with pytest.raises(SystemExit):
        load_config([], environ={"FC_CONTROLLER_PARENT_CONTROLLER": "http://a:1,,http://b:2"})
    assert "FC_CONTROLLER_PARENT_CONTROLLER" in (err := capsys.readouterr().err)
    assert "empty" in err
    config, _ = load_config(["--parent-controller", "http://a:1/,http://b:2"], environ={})
    assert config.parent_controller == "http://a:1,http://b:2"
    with pytest.raises(ConfigError, match=r"parent_controller .* got 'b:2'"):
        ControllerConfig(parent_controller="http://a:1,b:2")
    with pytest.raises(SystemExit) as demo:
        load_settings(["--controller-address", "http://a:1,b:2"], environ={})
    assert demo.value.code == 2
    assert "--controller-address" in (err := capsys.readouterr().err) and "'b:2'" in err


# -- the asyncio client against real controllers ------------------------------------------


async def test_worker_moves_to_the_next_controller_when_its_own_stops(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Registered at A; A stops: within one heartbeat interval the worker is registered at
    B, which routes to it; one WARNING names both; the goodbye goes to B."""
    a, b = await run_controller(), await run_controller()
    a_url = a.url
    worker = await make_worker(model_names=["m"], tokens=2)
    clock = FakeClock()
    interval = 0.5
    config = make_config(f"{a.url},{b.url}", worker_address=worker.url, interval=interval)
    client = HeartbeatClient(config, clock=clock.time, sleep=clock.sleep)
    await client.start()
    try:
        stats = await stats_when(client, lambda s: s.registered)
        assert (stats.controller, stats.switches) == (a.url, 0)
        assert await address_at(a) == worker.url
        assert await address_at(b) == ""
        await clock.wait_sleeping()
        with caplog.at_level(logging.INFO, logger="controller.worker"):
            await a.aclose()
            # One interval passes and no more: the move and the registration at B
            # must happen without further waiting.
            clock.advance(interval)
            stats = await stats_when(
                client, lambda s: s.controller == b.url and s.registrations == 2
            )
        assert stats.registered and stats.switches == 1
        assert client.controller_in_use == b.url
        assert await address_at(b) == worker.url
        async with http.post(f"{b.url}/worker_generate_stream", json={"model": "m"}) as r:
            assert [m["text"] for m in split_stream(await r.read())] == ["tok0", "tok0 tok1"]
        warnings = switch_warnings(caplog)
        assert len(warnings) == 1
        assert a_url in warnings[0] and warnings[0].endswith(f"moving to controller {b.url}")
    finally:
        await client.aclose()
    assert await address_at(b) == ""


async def test_a_refusal_is_not_a_reason_to_move(run_controller: RunController) -> None:
    """A 403 from the first controller is a configuration error: the worker keeps asking
    it (and logs the refusal) instead of registering elsewhere."""
    worker_tokens = TokenTable.from_lines([f"w1:{WORKER_TOKEN}"], "test")
    closed = ControllerConfig(host="127.0.0.1", port=0, access=Access(worker_tokens=worker_tokens))
    a, b = await run_controller(closed), await run_controller()
    config = make_config(f"{a.url},{b.url}", token=WRONG_TOKEN)
    async with HeartbeatClient(config) as client:
        stats = await stats_when(client, lambda s: s.failures >= 4)
    assert "HTTP 403" in (stats.last_error or "")
    assert (stats.controller, stats.switches, stats.registrations) == (a.url, 0, 0)
    assert list(b.registry) == []


@pytest.mark.parametrize(("mode", "moves"), [("error", True), ("garbage", False)])
async def test_a_5xx_moves_on_but_a_garbled_answer_does_not(
    run_controller: RunController, mode: str, moves: bool
) -> None:
    """A 5xx says that controller cannot serve now: the worker registers with the next. A
    200 that is not a controller's answer would be the same anywhere: it keeps retrying."""
    first = FakeController(mode=mode)
    await first.start()
    try:
        b = await run_controller()
        async with HeartbeatClient(make_config(f"{first.url},{b.url}")) as client:
            if moves:
                stats = await stats_when(client, lambda s: s.registered)
                assert (stats.controller, stats.switches) == (b.url, 1)
                assert await address_at(b) == "http://127.0.0.1:9001"
            else:
                stats = await stats_when(client, lambda s: s.failures >= 4)
                assert (stats.controller, stats.switches) == (first.url, 0)
                assert list(b.registry) == []
    finally:
        await first.stop()


async def test_the_rotation_wraps_and_an_outage_logs_once(
    run_controller: RunController, caplog: pytest.LogCaptureFixture
) -> None:
    """Started while neither controller runs: one WARNING for the move, one for 'none
    answers', then quiet; B comes up and gets the worker; B stops and A (the first
    address, after wrapping) gets it."""
    a_port, b_port = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"
    with caplog.at_level(logging.DEBUG, logger="controller.worker"):
        async with HeartbeatClient(make_config(f"{a_url},{b_url}")) as client:
            await stats_when(client, lambda s: s.failures >= 6)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 2
            assert warnings[0].endswith(f"moving to controller {b_url}")
            assert warnings[1].startswith(f"Cannot reach controller {b_url}")
            assert f"no other controller answers either, {a_url} is next" in warnings[1]
            b = await run_controller(ControllerConfig(host="127.0.0.1", port=b_port))
            await stats_when(client, lambda s: s.registered and s.controller == b_url)
            a = await run_controller(ControllerConfig(host="127.0.0.1", port=a_port))
            await b.aclose()
            stats = await stats_when(
                client, lambda s: s.controller == a_url and s.registrations == 2
            )
            assert stats.registered
            assert await address_at(a) == "http://127.0.0.1:9001"


async def test_a_controller_process_killed_outright_loses_no_worker(
    spawn_controller: SpawnController,
) -> None:
    """Two controller processes; the one in use dies by SIGKILL (no goodbye, connections
    cut): the worker's next heartbeat goes to the other, which then routes to it."""
    a, b = await spawn_controller(), await spawn_controller()
    async with HeartbeatClient(make_config(f"{a.url},{b.url}", interval=0.3)) as client:
        await stats_when(client, lambda s: s.registered and s.heartbeats >= 1)
        await a.kill()
        stats = await stats_when(
            client, lambda s: s.controller == b.url and s.registered and s.registrations == 2
        )
        assert stats.switches == 1
        assert await address_at_url(b.url) == "http://127.0.0.1:9001"
    assert await address_at_url(b.url) == ""


# -- the thread client, the demo worker, the parent link ----------------------------------


def test_the_thread_client_moves_on_too(servers: Servers) -> None:  # noqa: F811
    """SyncHeartbeatClient: registered at A; A stops; registered at B, which knows it."""
    from controller.worker import SyncHeartbeatClient

    a, b = servers.controller(), servers.controller()
    with SyncHeartbeatClient(make_config(f"{a.url},{b.url}")) as client:
        assert client.wait_registered(TIMEOUT)
        servers.lt.run(a.aclose())
        stats = client.wait_until(lambda s: s.controller == b.url and s.registrations == 2, TIMEOUT)
        assert stats is not None and stats.switches == 1
        assert servers.lt.call(lambda: b.registry.get("http://127.0.0.1:9001") is not None)
    # The goodbye went to B.
    assert servers.lt.call(lambda: b.registry.get("http://127.0.0.1:9001") is None)


async def test_demo_worker_takes_a_list_of_controllers(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """fc-demo-worker --controller-address DEAD,LIVE registers with the live one, which
    streams from it; stopping it leaves that controller."""
    live = await run_controller()
    dead = f"http://127.0.0.1:{free_port()}"
    argv = ["--host", "127.0.0.1", "--port", "0", "--controller-address", f"{dead},{live.url}"]
    settings, _ = load_settings([*argv, "--model-names", "demo", "--token-delay", "0"], environ={})
    async with DemoWorker(settings) as worker:
        assert worker.heartbeat is not None
        stats = await stats_when(worker.heartbeat, lambda s: s.registered)
        assert (stats.controller, stats.switches) == (live.url, 1)
        assert await address_at(live, "demo") == worker.worker_address
        body = {"model": "demo", "prompt": "hi", "max_new_tokens": 2}
        async with http.post(f"{live.url}/worker_generate_stream", json=body) as r:
            assert r.status == 200
            assert len(split_stream(await r.read())) == 2
    assert await address_at(live, "demo") == ""


async def test_the_parent_link_moves_to_the_next_parent(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A child given two parents registers with the first; when it stops, with the second,
    which streams through the child; a later offer and the goodbye go to the parent in
    use, not back to the first (restarted meanwhile)."""
    p1, p2 = await run_controller(), await run_controller()
    p1_port = int(p1.url.rsplit(":", 1)[1])
    child = await Controller.serve(
        ControllerConfig(
            host="127.0.0.1",
            port=0,
            parent_controller=f"{p1.url},{p2.url}",
            parent_heart_beat_interval=0.2,
        )
    )
    child_url = child.url
    try:
        first = await make_worker(model_names=["a"], tokens=2)
        async with http.post(f"{child.url}/register_worker", json=register_body(first)):
            pass
        await wait_until(lambda: p1.registry.model_names() == ["a"], TIMEOUT)
        await p1.aclose()
        await wait_until(lambda: p2.registry.model_names() == ["a"], TIMEOUT)
        async with http.post(f"{p2.url}/worker_generate_stream", json={"model": "a"}) as r:
            assert [m["text"] for m in split_stream(await r.read())] == ["tok0", "tok0 tok1"]

        # The first parent is back; the next offer still goes to the one in use.
        restarted = await run_controller(ControllerConfig(host="127.0.0.1", port=p1_port))
        second = await make_worker(model_names=["b"])
        async with http.post(f"{child.url}/register_worker", json=register_body(second)):
            pass
        await wait_until(lambda: p2.registry.model_names() == ["a", "b"], TIMEOUT)
        assert list(restarted.registry) == []
    finally:
        await child.aclose()
    assert p2.registry.get(child_url) is None
    assert list(restarted.registry) == []
