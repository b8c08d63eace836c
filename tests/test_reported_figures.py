"""Reported figures are bounded (issue 15): nobody draws traffic with ``speed: 1e12`` or
repels it with ``queue_length: 1e9``."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import MakeWorker, RunController, register_body


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0))


def status(speed: Any = 1, queue_length: Any = 0) -> dict[str, Any]:
    return {"model_names": ["m"], "speed": speed, "queue_length": queue_length}


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("speed", [0, -1, 0.0, 10_000.5, 1e12, 10**30])
async def test_a_registration_outside_the_speed_bounds_is_a_400_naming_speed(
    controller: Controller, http: aiohttp.ClientSession, speed: float
) -> None:
    """speed must be in (0, 10,000]: 0, negatives and anything larger are refused."""
    body = register_body("http://127.0.0.1:9", worker_status=status(speed=speed))
    code, answer = await post(http, f"{controller.url}/register_worker", body)
    assert (code, answer["field"]) == (400, "worker_status.speed")
    assert controller.registry.get("http://127.0.0.1:9") is None


@pytest.mark.parametrize("speed", [1e-6, 1, 10_000])
async def test_speeds_inside_the_bounds_register(
    controller: Controller, http: aiohttp.ClientSession, speed: float
) -> None:
    """The bounds are inclusive at 10,000 and exclusive at 0."""
    body = register_body("http://127.0.0.1:9", worker_status=status(speed=speed))
    assert (await post(http, f"{controller.url}/register_worker", body))[0] == 200


@pytest.mark.parametrize("queue_length", [-1, 1_000_001, 10**9])
async def test_a_queue_length_outside_the_bounds_is_a_400_naming_it(
    controller: Controller, http: aiohttp.ClientSession, queue_length: int
) -> None:
    """queue_length must be in [0, 1,000,000], at registration and in heartbeats alike."""
    name = "http://127.0.0.1:9"
    body = register_body(name, worker_status=status(queue_length=queue_length))
    code, answer = await post(http, f"{controller.url}/register_worker", body)
    assert (code, answer["field"]) == (400, "worker_status.queue_length")
    await post(
        http, f"{controller.url}/register_worker", register_body(name, worker_status=status())
    )
    beat = {"worker_name": name, "queue_length": queue_length}
    code, answer = await post(http, f"{controller.url}/receive_heart_beat", beat)
    assert (code, answer["field"]) == (400, "queue_length")
    worker = controller.registry.get(name)
    assert worker is not None and worker.queue_length == 0


async def test_a_probe_answer_may_say_speed_zero(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker asked for its status may answer speed 0 (a child controller with no
    worker left does): it is registered, and dispatch treats it as the last choice."""
    worker = await make_worker(speed=0)
    body = register_body(worker, status=False)
    assert (await post(http, f"{controller.url}/register_worker", body))[0] == 200
    entry = controller.registry.get(worker.url)
    assert entry is not None and entry.info.speed == 0


async def test_a_probe_answer_above_the_speed_bound_registers_nothing(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker answering speed 1e12 to the probe is not registered."""
    worker = await make_worker(speed=1e12)
    await post(http, f"{controller.url}/register_worker", register_body(worker, status=False))
    assert controller.registry.get(worker.url) is None
