"""Failover before the first byte and passive health (ejection of failing workers)."""

from __future__ import annotations

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register, stream


@pytest.fixture
async def controller(run_controller: RunController, clock: FakeClock) -> Controller:
    return await run_controller(ControllerConfig(host="127.0.0.1", port=0), clock=clock)


async def test_refused_connection_fails_over_to_healthy_worker(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker refusing connections is skipped: the client gets the healthy worker's stream."""
    dead = await make_worker(crashed=True)
    healthy = await make_worker(tokens=2)
    await register(http, controller, dead, healthy)

    messages = await stream(http, controller)

    assert [m["error_code"] for m in messages] == [0, 0]
    assert messages[-1]["text"] == "tok0 tok1"
    assert len(healthy.stream_bodies) == 1


async def test_http_error_before_first_byte_fails_over(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker answering HTTP 500 is replaced by another before the client sees anything."""
    broken = await make_worker(stream_status=500)
    healthy = await make_worker(tokens=1)
    await register(http, controller, broken, healthy)

    messages = await stream(http, controller, {"model": "m", "prompt": "x"})

    assert messages == [{"text": "tok0", "error_code": 0}]
    assert broken.stream_bodies and healthy.stream_bodies


async def test_failed_worker_leaves_rotation_for_get_worker_address(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """After a failed relay, /get_worker_address stops handing out the failed worker."""
    dead = await make_worker(crashed=True)
    healthy = await make_worker()
    await register(http, controller, dead, healthy)
    await stream(http, controller)

    addresses = {
        (await post_ok(http, controller, "/get_worker_address", {"model": "m"}))["address"]
        for _ in range(6)
    }

    assert addresses == {healthy.url}


async def test_failure_after_first_byte_ends_with_in_band_error(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker dying mid-stream is not retried: messages so far, then the 50006 message."""
    dying = await make_worker(tokens=5, die_after=2)
    spare = await make_worker()
    await register(http, controller, dying, spare)

    messages = await stream(http, controller)

    assert [m["error_code"] for m in messages] == [0, 0, 50006]
    assert spare.stream_bodies == []
    assert controller.registry.is_ejected(controller.registry.get(dying.url))  # type: ignore[arg-type]


async def test_every_worker_failing_gives_one_in_band_error(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """When every worker fails before its first byte, the client gets a single 50006."""
    dead = [await make_worker(crashed=True) for _ in range(2)]
    await register(http, controller, *dead)

    messages = await stream(http, controller)

    assert [m["error_code"] for m in messages] == [50006]


async def test_attempts_are_bounded(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """With stream_attempts=1 a failing worker's error reaches the client, untried spares idle."""
    controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0, stream_attempts=1))
    broken = await make_worker(stream_status=503)
    spare = await make_worker()
    await register(http, controller, broken, spare)

    messages = await stream(http, controller)

    assert [m["error_code"] for m in messages] == [50006]
    assert spare.stream_bodies == []


async def test_heartbeat_brings_ejected_worker_back(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker ejected after one failure is routable again once it sends a heartbeat."""
    flaky = await make_worker(stream_status=500)
    other = await make_worker()
    await register(http, controller, flaky, other)
    await stream(http, controller)
    info = controller.registry.get(flaky.url)
    assert info is not None and controller.registry.is_ejected(info)

    beat = {"worker_name": flaky.url, "queue_length": 0}
    assert await post_ok(http, controller, "/receive_heart_beat", beat) == {"exist": True}

    assert not controller.registry.is_ejected(info)
    # Both idle with equal queues: the earliest registered (the flaky one) is chosen again.
    answer = await post_ok(http, controller, "/get_worker_address", {"model": "m"})
    assert answer == {"address": flaky.url}


async def test_outlier_waits_out_a_doubling_ejection(
    controller: Controller, clock: FakeClock, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Three failures in a row make an outlier: heartbeats no longer lift it, time does."""
    flaky = await make_worker(stream_status=500)
    other = await make_worker()
    await register(http, controller, flaky, other)
    info = controller.registry.get(flaky.url)
    assert info is not None
    beat = {"worker_name": flaky.url, "queue_length": 0}
    for _ in range(3):
        await post_ok(http, controller, "/receive_heart_beat", beat)
        await stream(http, controller)
    assert info.consecutive_failures == 3

    await post_ok(http, controller, "/receive_heart_beat", beat)
    assert controller.registry.is_ejected(info)
    # Third failure in a row: 5 s doubled twice.
    clock.advance(19.9)
    assert controller.registry.is_ejected(info)
    clock.advance(0.2)
    assert not controller.registry.is_ejected(info)
    answer = await post_ok(http, controller, "/get_worker_address", {"model": "m"})
    assert answer == {"address": flaky.url}


async def test_all_ejected_workers_are_still_tried(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """When every worker of a model is ejected they are still handed out, not an empty address."""
    flaky = await make_worker(stream_status=500)
    await register(http, controller, flaky)
    await stream(http, controller)
    info = controller.registry.get(flaky.url)
    assert info is not None and controller.registry.is_ejected(info)

    answer = await post_ok(http, controller, "/get_worker_address", {"model": "m"})

    assert answer == {"address": flaky.url}


async def test_queue_count_settles_after_failover(
    controller: Controller, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Every attempt of a failed-over stream is released from its worker's queue length."""
    broken = await make_worker(stream_status=500, queue_length=2)
    healthy = await make_worker(queue_length=1)
    await register(http, controller, broken, healthy)

    await stream(http, controller)

    queues = {w.name: w.queue_length for w in controller.registry}
    assert queues == {broken.url: 2, healthy.url: 1}
