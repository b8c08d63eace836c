"""The registry: re-registration replaces, heartbeats keep workers alive, silence expires them."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig, WorkerStatus
from controller.protocol import RegisterRequest

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register_body, wait_until

EXPIRATION = 90.0


def config(**overrides: Any) -> ControllerConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "heart_beat_expiration": EXPIRATION,
        "load_poll_interval": 0,
    }
    settings.update(overrides)
    return ControllerConfig(**settings)


@pytest.fixture
async def controller(run_controller: RunController, clock: FakeClock) -> Controller:
    return await run_controller(config(), clock=clock)


post = post_ok


async def address(http: aiohttp.ClientSession, controller: Controller, model: str) -> str:
    answer = await post(http, controller, "/get_worker_address", {"model": model})
    assert isinstance(answer["address"], str)
    return answer["address"]


async def models(http: aiohttp.ClientSession, controller: Controller) -> list[str]:
    answer = await post(http, controller, "/list_models")
    return sorted(answer["models"])


async def heartbeat(
    http: aiohttp.ClientSession, controller: Controller, name: str, queue_length: int = 0
) -> bool:
    body = {"worker_name": name, "queue_length": queue_length}
    answer = await post(http, controller, "/receive_heart_beat", body)
    assert set(answer) == {"exist"}
    exist = answer["exist"]
    assert isinstance(exist, bool)
    return exist


async def test_reregistering_a_name_replaces_its_models_and_speed(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """Registering an existing worker_name again replaces its entry; old models are gone."""
    name = "http://127.0.0.1:1"
    first = {"model_names": ["old-a", "old-b"], "speed": 1, "queue_length": 0}
    second = {"model_names": ["new"], "speed": 2, "queue_length": 3}
    await post(http, controller, "/register_worker", register_body(name, worker_status=first))
    await post(http, controller, "/register_worker", register_body(name, worker_status=second))

    assert await models(http, controller) == ["new"]
    assert await address(http, controller, "old-a") == ""
    assert await address(http, controller, "new") == name
    assert len(controller.registry) == 1
    info = controller.registry.get(name)
    assert info is not None
    assert (info.info.model_names, info.info.speed) == (("new",), 2)


async def test_silent_worker_is_unroutable_within_a_second_of_expiring(
    controller: Controller, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A checked worker silent past the expiration stops being routed or listed at once."""
    name = "http://127.0.0.1:1"
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    await post(http, controller, "/register_worker", register_body(name, worker_status=status))

    clock.advance(EXPIRATION - 0.5)
    assert await address(http, controller, "m") == name
    assert await models(http, controller) == ["m"]

    # The contract: unroutable no later than expiration + 1 s after the last heartbeat,
    # whether or not the background sweep has run (it cannot have: the clock is fake).
    clock.advance(1.5)
    assert await address(http, controller, "m") == ""
    assert await models(http, controller) == []
    assert await post(http, controller, "/worker_get_status") == {
        "model_names": [],
        "speed": 0,
        "queue_length": 0,
    }


async def test_expire_now_removes_silent_worker_and_logs_how_long_it_was_silent(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep forgets an expired worker and logs its name and silence at INFO."""
    controller = Controller(config(), clock=clock)
    status = WorkerStatus(("m",), 1, 0)
    await controller.prober.register(RegisterRequest("http://10.0.0.5:21002", True, status, False))
    await controller.prober.register(RegisterRequest("http://10.0.0.6:21002", True, status, False))
    clock.advance(60)
    assert controller.registry.heartbeat("http://10.0.0.6:21002", 0)
    clock.advance(EXPIRATION + 1.5 - 60)

    with caplog.at_level(logging.INFO, logger="controller"):
        removed = controller.expire_now()

    assert [w.name for w in removed] == ["http://10.0.0.5:21002"]
    assert len(controller.registry) == 1
    assert controller.registry.get("http://10.0.0.6:21002") is not None
    lines = [r for r in caplog.records if "10.0.0.5:21002" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert f"{EXPIRATION + 1.5:.1f}" in lines[0].getMessage()


async def test_background_sweep_removes_an_expired_worker(
    run_controller: RunController, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Without any request, the background task forgets a worker once it has expired."""
    controller = await run_controller(config(heart_beat_expiration=0.2), clock=clock)
    status = WorkerStatus(("m",), 1, 0)
    with caplog.at_level(logging.INFO, logger="controller"):
        await controller.prober.register(
            RegisterRequest("http://10.0.0.5:21002", True, status, False)
        )
        clock.advance(0.3)
        # The sweep runs every min(1 s, expiration / 2) of real time.
        await wait_until(lambda: len(controller.registry) == 0, timeout=2)
    assert any(
        "10.0.0.5:21002" in r.getMessage() and "0.3" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO
    )


async def test_unchecked_worker_never_expires(
    controller: Controller, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A worker registered with check_heart_beat false stays however long it is silent."""
    name = "http://127.0.0.1:1"
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    body = register_body(name, worker_status=status, check_heart_beat=False)
    await post(http, controller, "/register_worker", body)

    clock.advance(EXPIRATION * 100)
    assert controller.expire_now() == []

    assert await address(http, controller, "m") == name
    assert await models(http, controller) == ["m"]
    assert await heartbeat(http, controller, name)


async def test_heartbeats_keep_a_worker_alive_past_the_expiration(
    controller: Controller, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Each heartbeat restarts the expiration: a worker beating regularly is never dropped."""
    name = "http://127.0.0.1:1"
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    await post(http, controller, "/register_worker", register_body(name, worker_status=status))
    for _ in range(4):
        clock.advance(EXPIRATION - 1)
        assert await heartbeat(http, controller, name)
    controller.expire_now()
    assert await address(http, controller, "m") == name


async def test_heartbeat_from_unknown_worker_gets_exist_false(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """A heartbeat from a worker that never registered gets {"exist": false} and adds nothing."""
    assert not await heartbeat(http, controller, "http://127.0.0.1:1", 0)
    assert len(controller.registry) == 0
    assert await models(http, controller) == []


async def test_heartbeat_from_expired_worker_gets_exist_false_until_it_reregisters(
    controller: Controller, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """An expired worker is not revived by a heartbeat; registering again brings it back."""
    name = "http://127.0.0.1:1"
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    await post(http, controller, "/register_worker", register_body(name, worker_status=status))
    clock.advance(EXPIRATION + 1)

    assert not await heartbeat(http, controller, name)
    assert await address(http, controller, "m") == ""
    assert not await heartbeat(http, controller, name)

    await post(http, controller, "/register_worker", register_body(name, worker_status=status))
    assert await heartbeat(http, controller, name)
    assert await address(http, controller, "m") == name


async def test_heartbeat_updates_the_queue_length_dispatch_uses(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A heartbeat's queue_length replaces the worker's load, which changes who gets work."""
    a = await make_worker()
    b = await make_worker()
    await post(http, controller, "/register_worker", register_body(a))
    await post(http, controller, "/register_worker", register_body(b))

    assert await heartbeat(http, controller, a.url, 5)
    info = controller.registry.get(a.url)
    assert info is not None
    assert info.queue_length == 5
    assert await address(http, controller, "m") == b.url

    # b now holds the request just handed out (1); a reports an empty queue again.
    assert await heartbeat(http, controller, a.url, 0)
    assert await address(http, controller, "m") == a.url
