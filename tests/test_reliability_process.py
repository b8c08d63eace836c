"""A real controller process: signals drain and exit, a state file bridges a restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import (
    ControllerProcess,
    FakeWorker,
    MakeWorker,
    SpawnController,
    register_body,
    split_stream,
)

pytestmark = pytest.mark.slow

#: what a controller may take after its drain: aiohttp's own shutdown wait (2 s) and slack
EXIT_SLACK = 4.0


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def register(
    http: aiohttp.ClientSession, controller: ControllerProcess, w: FakeWorker
) -> None:
    await post(http, f"{controller.url}/register_worker", register_body(w))


async def refuses_connections(url: str, timeout: float = 5.0) -> None:
    """Wait until nothing accepts connections at ``url`` any more."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.02)


async def open_stream(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """Start a stream and read its first message; the response is left open."""
    response = await http.post(f"{url}/worker_generate_stream", json={"model": "m"})
    assert response.status == 200
    return response


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_streams_in_flight_and_exits_0(
    spawn_controller: SpawnController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    signum: int,
) -> None:
    """On SIGTERM/SIGINT new work is refused, a stream in flight finishes whole, exit is 0."""
    controller = await spawn_controller("--drain-timeout", "10")
    worker = await make_worker(tokens=3, hang_after=1)
    await register(http, controller, worker)
    response = await open_stream(http, controller.url)
    first = await response.content.readuntil(b"\0")

    controller.signal(signum)
    await controller.wait_for_line("shutting down")
    await controller.wait_for_line("Draining 1 relayed request")
    await refuses_connections(controller.url)
    # The worker finishes its generation while the controller drains.
    worker.release.set()
    rest = await response.read()
    response.release()
    code = await controller.wait(EXIT_SLACK)

    assert [m["text"] for m in split_stream(first + rest)] == [
        "tok0",
        "tok0 tok1",
        "tok0 tok1 tok2",
    ]
    assert code == 0


async def test_stream_outliving_drain_timeout_ends_in_band_and_exit_is_0(
    spawn_controller: SpawnController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A stream still running at --drain-timeout gets the 50006 message; the exit status is 0."""
    drain = 0.5
    controller = await spawn_controller("--drain-timeout", str(drain))
    worker = await make_worker(tokens=3, hang_after=1)
    await register(http, controller, worker)
    response = await open_stream(http, controller.url)
    first = await response.content.readuntil(b"\0")
    loop = asyncio.get_running_loop()

    signalled = loop.time()
    controller.signal(signal.SIGTERM)
    rest = await asyncio.wait_for(response.read(), drain + EXIT_SLACK)
    ended = loop.time() - signalled
    response.release()
    code = await controller.wait(EXIT_SLACK)

    assert [m["error_code"] for m in split_stream(first + rest)] == [0, 50006]
    assert rest.endswith(b"\0")
    assert drain <= ended < drain + 1.0
    assert code == 0
    await asyncio.wait_for(worker.upstream_gone.wait(), 2)
    assert any("Drain timeout: ending 1 stream(s)" in line for line in controller.lines)


async def test_second_signal_exits_at_once_despite_a_hanging_stream(
    spawn_controller: SpawnController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A second signal during the drain ends the process at once, whatever still hangs."""
    controller = await spawn_controller("--drain-timeout", "60")
    worker = await make_worker(tokens=3, hang_after=1)
    await register(http, controller, worker)
    response = await open_stream(http, controller.url)
    await response.content.readuntil(b"\0")
    loop = asyncio.get_running_loop()

    controller.signal(signal.SIGTERM)
    await controller.wait_for_line("Draining 1 relayed request")
    second = loop.time()
    controller.signal(signal.SIGINT)
    code = await controller.wait(2.0)
    took = loop.time() - second

    assert code != 0
    assert took < 1.0
    response.close()


async def test_restart_with_state_file_routes_at_once(
    spawn_controller: SpawnController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A controller restarted on the same --state-file hands out the worker on its first call."""
    state = str(tmp_path / "state.json")
    worker = await make_worker(model_names=["m", "n"])
    first = await spawn_controller("--state-file", state)
    await register(http, first, worker)
    first.signal(signal.SIGTERM)
    assert await first.wait(EXIT_SLACK) == 0

    second = await spawn_controller("--state-file", state)

    assert await post(http, f"{second.url}/get_worker_address", {"model": "n"}) == {
        "address": worker.url
    }
    assert await post(http, f"{second.url}/list_models", None) == {"models": ["m", "n"]}
    beat = {"worker_name": worker.url, "queue_length": 0}
    assert await post(http, f"{second.url}/receive_heart_beat", beat) == {"exist": True}
    assert any("Restored 1 worker(s)" in line for line in second.lines)


async def test_restart_without_state_file_routes_after_the_next_heartbeat(
    spawn_controller: SpawnController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Without a state file a restart forgets workers until their heartbeat re-registers them."""
    worker = await make_worker()
    first = await spawn_controller()
    await register(http, first, worker)
    first.signal(signal.SIGTERM)
    assert await first.wait(EXIT_SLACK) == 0

    second = await spawn_controller()
    assert await post(http, f"{second.url}/get_worker_address", {"model": "m"}) == {"address": ""}
    beat = {"worker_name": worker.url, "queue_length": 0}
    # What a FastChat worker does on {"exist": false}: register again.
    assert await post(http, f"{second.url}/receive_heart_beat", beat) == {"exist": False}
    await register(http, second, worker)

    assert await post(http, f"{second.url}/get_worker_address", {"model": "m"}) == {
        "address": worker.url
    }


async def test_body_size_flags_set_the_413_limits(
    spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    """--max-control-body-size 2KiB and --max-body-size 3KiB: a body at each limit is read,
    one byte more gets a JSON 413 naming the setting."""
    controller = await spawn_controller(
        "--max-control-body-size", "2KiB", "--max-body-size", "3KiB"
    )
    for path, size, setting in (
        ("/get_worker_address", 2048, "max_control_body_size"),
        ("/worker_generate_stream", 3072, "max_body_size"),
    ):
        at_limit = b'{"model": "zz"}'.ljust(size)
        async with http.post(f"{controller.url}{path}", data=at_limit) as r:
            assert r.status == 200
        async with http.post(f"{controller.url}{path}", data=at_limit + b" ") as r:
            assert r.status == 413
            answer = await r.json()
            assert answer["error"] == "payload_too_large"
            assert setting in answer["message"]
