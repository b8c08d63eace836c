"""What a load poll may change: a worker's load, never its liveness or the models it serves."""

from __future__ import annotations

from typing import Any

import aiohttp

from controller import Controller, ControllerConfig

from .conftest import (
    FakeClock,
    MakeWorker,
    RunController,
    post_ok,
    register_body,
    split_stream,
)

EXPIRATION = 10.0


def config(**overrides: Any) -> ControllerConfig:
    # No background polls: each test polls when it wants to, on its own clock.
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "load_poll_interval": 0}
    settings.update(overrides)
    return ControllerConfig(**settings)


async def address(http: aiohttp.ClientSession, controller: Controller, model: str) -> str:
    answer: str = (await post_ok(http, controller, "/get_worker_address", {"model": model}))[
        "address"
    ]
    return answer


async def test_a_worker_answering_polls_but_not_heartbeating_expires(
    run_controller: RunController,
    make_worker: MakeWorker,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    """A worker that stopped heartbeating is dropped after the expiration even though it
    keeps getting traffic and answering every load poll."""
    controller = await run_controller(config(heart_beat_expiration=EXPIRATION), clock=clock)
    worker = await make_worker(model_names=["m"])
    await post_ok(http, controller, "/register_worker", register_body(worker))

    # Traffic and a poll answered every 3 s; no heartbeat ever after the registration.
    for _ in range(3):
        clock.advance(3)
        assert await address(http, controller, "m") == worker.url
        assert await controller.prober.poll_load() == 1
    clock.advance(EXPIRATION - 9 + 0.5)

    assert await address(http, controller, "m") == ""
    assert (await post_ok(http, controller, "/list_models"))["models"] == []
    assert [w.name for w in controller.expire_now()] == [worker.url]


async def test_a_load_poll_takes_the_queue_and_nothing_else(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    """A poll answer naming other models or another speed changes only the queue length;
    /refresh_all_workers then takes the models and the speed."""
    controller = await run_controller(config())
    worker = await make_worker(model_names=["m"], speed=1)
    await post_ok(http, controller, "/register_worker", register_body(worker))
    assert await address(http, controller, "m") == worker.url
    worker.model_names, worker.speed, worker.queue_length = ["n"], 4, 3

    assert await controller.prober.poll_load() == 1

    entry = controller.registry.get(worker.url)
    assert entry is not None
    assert (entry.info.model_names, entry.info.speed, entry.queue_length) == (("m",), 1, 3)
    assert await address(http, controller, "m") == worker.url

    await post_ok(http, controller, "/refresh_all_workers")
    assert (entry.info.model_names, entry.info.speed) == (("n",), 4)
    assert await address(http, controller, "m") == ""


async def test_a_parent_keeps_a_restarted_childs_models(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    """A parent whose load poll reaches a restarted child before the child's workers came
    back keeps the child's models, and streams through it once they are back."""
    parent = await run_controller(config())
    first_child = await run_controller(config())
    child_url = first_child.url
    worker = await make_worker(model_names=["m"], tokens=2)
    await post_ok(http, first_child, "/register_worker", register_body(worker))
    # As FastChat's register_worker script does it: no status, no heartbeats expected.
    manual = {"worker_name": child_url, "check_heart_beat": False, "worker_status": None}
    await post_ok(http, parent, "/register_worker", manual)
    assert await address(http, parent, "m") == child_url

    # The child restarts on the same port with an empty registry; the parent's poll of
    # its busy entry gets {"model_names": [], ...}.
    port = int(child_url.rsplit(":", 1)[1])
    await first_child.aclose()
    child = await run_controller(config(port=port))
    assert await controller_status(http, child) == {
        "model_names": [],
        "speed": 0,
        "queue_length": 0,
    }
    assert await parent.prober.poll_load() == 1

    assert (await post_ok(http, parent, "/list_models"))["models"] == ["m"]
    entry = parent.registry.get(child_url)
    assert entry is not None and entry.queue_length == 0

    # The worker's next heartbeat gets exist: false and it registers again.
    beat = {"worker_name": worker.url, "queue_length": 0}
    assert await post_ok(http, child, "/receive_heart_beat", beat) == {"exist": False}
    await post_ok(http, child, "/register_worker", register_body(worker))
    async with http.post(f"{parent.url}/worker_generate_stream", json={"model": "m"}) as r:
        messages = split_stream(await r.read())
    assert [m["text"] for m in messages] == ["tok0", "tok0 tok1"]


async def controller_status(http: aiohttp.ClientSession, controller: Controller) -> Any:
    return await post_ok(http, controller, "/worker_get_status")
