"""Status probes: registration without a status, /refresh_all_workers, and no stalls meanwhile."""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register_body, wait_until

PROBE_TIMEOUT = 0.5
#: a probe timeout no test waits out: a probe that ends meanwhile was answered or released
NEVER = 60.0
#: how long a test waits for what it expects: a bound against hanging, not a latency bound
PATIENCE = 5.0

GOOD_STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}

#: worker knobs making /worker_get_status fail, and how
BAD_STATUS = [
    pytest.param({"status_garbage": True}, id="html-instead-of-json"),
    pytest.param({"model_names": "m"}, id="model-names-a-string"),
    pytest.param({"speed": -1}, id="negative-speed"),
    pytest.param({"queue_length": "3"}, id="queue-length-text"),
    pytest.param({"status_hang": True}, id="never-answers"),
]


def config(**overrides: Any) -> ControllerConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "load_poll_interval": 0,
        "status_probe_timeout": PROBE_TIMEOUT,
    }
    settings.update(overrides)
    return ControllerConfig(**settings)


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(config())


async def models(http: aiohttp.ClientSession, controller: Controller) -> list[str]:
    return sorted((await post_ok(http, controller, "/list_models"))["models"])


@pytest.mark.parametrize(
    "status", [pytest.param("missing"), pytest.param(None, id="null"), pytest.param({}, id="{}")]
)
async def test_registration_without_status_asks_the_worker(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker, status: Any
) -> None:
    """A registration whose worker_status is missing, null or {} registers what the worker says."""
    worker = await make_worker(model_names=["x", "y"], speed=2, queue_length=3)
    body = register_body(worker, status=False)
    if status != "missing":
        body["worker_status"] = status
    assert await post_ok(http, controller, "/register_worker", body) is None
    assert worker.status_calls == 1
    info = controller.registry.get(worker.url)
    assert info is not None
    assert (info.info.model_names, info.info.speed, info.queue_length) == (("x", "y"), 2, 3)
    assert await models(http, controller) == ["x", "y"]


@pytest.mark.parametrize("knobs", BAD_STATUS)
async def test_registration_without_status_registers_nothing_when_the_probe_fails(
    controller: Controller,
    http: aiohttp.ClientSession,
    make_worker: MakeWorker,
    knobs: dict[str, Any],
) -> None:
    """If the worker does not answer /worker_get_status well in time, nothing is registered."""
    worker = await make_worker(**knobs)
    # A worker that never answers is never released: only the probe timeout ends the wait.
    async with asyncio.timeout(PATIENCE):
        answer = await post_ok(
            http, controller, "/register_worker", register_body(worker, status=False)
        )
    assert answer is None
    assert worker.status_calls == 1
    assert len(controller.registry) == 0
    assert await models(http, controller) == []


async def test_registration_of_an_unreachable_worker_registers_nothing(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A registration without status for a worker whose port is closed adds nothing."""
    worker = await make_worker(crashed=True)
    body = register_body(worker, status=False)
    assert await post_ok(http, controller, "/register_worker", body) is None
    assert len(controller.registry) == 0


async def test_status_probe_timeout_is_configurable(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """status_probe_timeout bounds the wait for a worker that never answers its probe."""
    default = ControllerConfig().status_probe_timeout
    controller = await run_controller(config(status_probe_timeout=default / 25))
    worker = await make_worker(status_hang=True)
    # The worker is never released: an answer before the default timeout could have run
    # out can only come from the configured one.
    async with asyncio.timeout(default / 2):
        answer = await post_ok(
            http, controller, "/register_worker", register_body(worker, status=False)
        )
    assert answer is None
    assert worker.status_calls == 1
    assert len(controller.registry) == 0


async def get_success(http: aiohttp.ClientSession, controller: Controller) -> Any:
    async with http.get(f"{controller.url}/test_connection") as r:
        return await r.json()


async def assert_controller_answers_meanwhile(
    http: aiohttp.ClientSession,
    controller: Controller,
    model: str,
    address: str,
    pending: asyncio.Task[Any],
) -> None:
    """/test_connection, /get_worker_address and /list_models answer while ``pending`` (a
    request waiting on a probe that only the test can release) still waits."""
    async with asyncio.timeout(PATIENCE):
        for _ in range(3):
            assert await get_success(http, controller) == "success"
            answer = await post_ok(http, controller, "/get_worker_address", {"model": model})
            assert answer == {"address": address}
            assert model in await models(http, controller)
    assert not pending.done()


async def test_refresh_in_flight_stalls_nothing_and_keeps_workers_routable(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """While a refresh waits on a hung worker, other requests answer at once and it stays routed."""
    controller = await run_controller(config(status_probe_timeout=NEVER))
    hung = await make_worker(model_names=["h"], status_hang=True)
    await post_ok(http, controller, "/register_worker", register_body(hung))

    refresh = asyncio.create_task(post_ok(http, controller, "/refresh_all_workers"))
    await wait_until(lambda: hung.status_calls == 1)
    await assert_controller_answers_meanwhile(http, controller, "h", hung.url, refresh)

    hung.release.set()
    assert await asyncio.wait_for(refresh, PATIENCE) is None
    assert controller.registry.get(hung.url) is not None


async def test_registration_probe_in_flight_stalls_nothing(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """While a registration waits on the worker's status, other requests and registrations go on."""
    controller = await run_controller(config(status_probe_timeout=NEVER))
    hung = await make_worker(model_names=["h"], status_hang=True)
    other = await make_worker(model_names=["m"])
    registering = asyncio.create_task(
        post_ok(http, controller, "/register_worker", register_body(hung, status=False))
    )
    await wait_until(lambda: hung.status_calls == 1)

    async with asyncio.timeout(PATIENCE):
        await post_ok(http, controller, "/register_worker", register_body(other))
    await assert_controller_answers_meanwhile(http, controller, "m", other.url, registering)

    hung.release.set()
    assert await asyncio.wait_for(registering, PATIENCE) is None
    assert await models(http, controller) == ["h", "m"]


async def test_refresh_probes_50_hung_workers_at_once(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """Workers are probed together: 50 hung ones are all asked at once, and all are dropped."""
    controller = await run_controller(config(status_probe_timeout=NEVER))
    # Each hangs until released, then answers garbage.
    hung = [
        await make_worker(model_names=["h"], status_hang=True, status_garbage=True)
        for _ in range(50)
    ]
    healthy = await make_worker(model_names=["m"])
    for worker in [*hung, healthy]:
        await post_ok(http, controller, "/register_worker", register_body(worker))
    assert len(controller.registry) == 51

    refresh = asyncio.create_task(post_ok(http, controller, "/refresh_all_workers"))
    # Probed one after another, the second would wait for the first to time out (NEVER).
    await wait_until(lambda: all(w.status_calls == 1 for w in hung), timeout=PATIENCE)
    assert not refresh.done()
    for worker in hung:
        worker.release.set()
    assert await asyncio.wait_for(refresh, PATIENCE) is None

    assert len(controller.registry) == 1
    assert await models(http, controller) == ["m"]
    assert (await post_ok(http, controller, "/get_worker_address", {"model": "h"})) == {
        "address": ""
    }


@pytest.mark.parametrize("knobs", BAD_STATUS)
async def test_refresh_drops_workers_with_a_bad_status_answer(
    controller: Controller,
    http: aiohttp.ClientSession,
    make_worker: MakeWorker,
    knobs: dict[str, Any],
) -> None:
    """A worker answering its refresh probe with garbage, or not at all, is dropped."""
    bad = await make_worker(**knobs)
    good = await make_worker(model_names=["g"])
    await post_ok(
        http, controller, "/register_worker", register_body(bad, worker_status=GOOD_STATUS)
    )
    await post_ok(http, controller, "/register_worker", register_body(good))

    assert await post_ok(http, controller, "/refresh_all_workers") is None

    assert controller.registry.get(bad.url) is None
    assert controller.registry.get(good.url) is not None
    assert await models(http, controller) == ["g"]


async def test_refresh_gives_answering_workers_a_fresh_heartbeat(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    make_worker: MakeWorker,
    clock: FakeClock,
) -> None:
    """A worker that answered a refresh counts as having sent a heartbeat then."""
    controller = await run_controller(config(heart_beat_expiration=90), clock=clock)
    worker = await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(worker))
    clock.advance(80)
    await post_ok(http, controller, "/refresh_all_workers")
    clock.advance(80)
    assert await post_ok(http, controller, "/get_worker_address", {"model": "m"}) == {
        "address": worker.url
    }
    clock.advance(11)
    assert await post_ok(http, controller, "/get_worker_address", {"model": "m"}) == {"address": ""}


async def test_refresh_keeps_a_worker_that_reregistered_while_it_was_probed(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A registration arriving during a refresh wins over that refresh's failed probe."""
    worker = await make_worker(model_names=["m"], status_hang=True)
    await post_ok(http, controller, "/register_worker", register_body(worker))
    refresh = asyncio.create_task(post_ok(http, controller, "/refresh_all_workers"))
    await wait_until(lambda: worker.status_calls == 1)
    fresh = {"model_names": ["m2"], "speed": 1, "queue_length": 0}
    await post_ok(http, controller, "/register_worker", register_body(worker, worker_status=fresh))

    assert await asyncio.wait_for(refresh, PATIENCE) is None

    assert await models(http, controller) == ["m2"]


async def test_worker_get_status_skips_workers_that_do_not_answer(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/worker_get_status sums the workers that answer; one that never does costs a timeout."""
    hung = await make_worker(model_names=["h"], status_hang=True)
    live = await make_worker(model_names=["m"], speed=2, queue_length=1)
    await post_ok(
        http, controller, "/register_worker", register_body(hung, worker_status=GOOD_STATUS)
    )
    await post_ok(http, controller, "/register_worker", register_body(live))

    # The hung worker is never released: only its probe's timeout lets the answer come.
    async with asyncio.timeout(PATIENCE):
        answer = await post_ok(http, controller, "/worker_get_status")

    assert answer == {"model_names": ["m"], "speed": 2, "queue_length": 1}


async def test_failed_probes_leave_nothing_for_the_garbage_collector(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """Twenty registered workers whose port refuses connections, asked for their status:
    the failures are freed at once (nothing in reference cycles), not left for a full
    garbage collection to find; before, each failed probe left its client error and
    about 80 other objects in cycles."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connecting is refused
    status = {"model_names": ["dead"], "speed": 1, "queue_length": 0}
    for i in range(20):
        body = register_body(f"http://127.0.0.1:{port}/w{i}", worker_status=status)
        await post_ok(http, controller, "/register_worker", body)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answer = await post_ok(http, controller, "/worker_get_status")
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, aiohttp.ClientConnectorError)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert answer == {"model_names": [], "speed": 0, "queue_length": 0}
    assert left == []
