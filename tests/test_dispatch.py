"""Dispatch: shortest_queue and lottery choices, and the queue accounting they rely on."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig, protocol
from controller.errors import BadRequestError
from controller.jsonbody import read, read_as

from .conftest import (
    FakeClock,
    FakeWorker,
    MakeWorker,
    RunController,
    post_ok,
    register_body,
    split_stream,
    wait_until,
)

# Ejections after a failed relay last this long; tests move the fake clock past them to see
# the queue accounting alone decide.
EJECTION = 1.0


def config(**overrides: Any) -> ControllerConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        # Polling would overwrite the counts under test with the fake workers' static answers.
        "load_poll_interval": 0,
        "dispatch_method": "shortest_queue",
        "stream_attempts": 1,
        "ejection_base": EJECTION,
        "ejection_max": EJECTION,
    }
    settings.update(overrides)
    return ControllerConfig(**settings)


@pytest.fixture
async def controller(run_controller: RunController, clock: FakeClock) -> Controller:
    return await run_controller(config(), clock=clock)


post = post_ok


async def register(
    http: aiohttp.ClientSession, controller: Controller, name: str, speed: float, queue: int
) -> None:
    status = {"model_names": ["m"], "speed": speed, "queue_length": queue}
    await post(http, controller, "/register_worker", register_body(name, worker_status=status))


async def pick(http: aiohttp.ClientSession, controller: Controller, model: str = "m") -> str:
    answer = await post(http, controller, "/get_worker_address", {"model": model})
    address = answer["address"]
    assert isinstance(address, str)
    return address


def queue(controller: Controller, worker: FakeWorker | str) -> int:
    name = worker if isinstance(worker, str) else worker.url
    info = controller.registry.get(name)
    assert info is not None, f"{name} is not registered"
    return info.queue_length


W1, W2, W3 = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"


# -- shortest_queue ----------------------------------------------------------------------


async def test_shortest_queue_picks_smallest_queue_per_speed(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """shortest_queue picks the smallest queue_length / speed, counting each pick it makes."""
    await register(http, controller, W1, speed=2, queue=4)  # 2.0
    await register(http, controller, W2, speed=1, queue=3)  # 3.0
    await register(http, controller, W3, speed=4, queue=5)  # 1.25
    # W3 goes 1.25 -> 1.5 -> 1.75 -> 2.0, where it ties with W1, registered earlier.
    assert [await pick(http, controller) for _ in range(4)] == [W3, W3, W3, W1]


async def test_shortest_queue_ties_go_to_the_earliest_registered(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """Among workers with equal queue_length / speed the first registered wins."""
    await register(http, controller, W1, speed=1, queue=1)
    await register(http, controller, W2, speed=2, queue=2)
    await register(http, controller, W3, speed=1, queue=1)
    assert await pick(http, controller) == W1
    # W1 is at 2 now; W2 (1.0) and W3 (1.0) tie and W2 came first.
    assert await pick(http, controller) == W2
    assert await pick(http, controller) == W3


async def register_probed(
    http: aiohttp.ClientSession, controller: Controller, worker: FakeWorker
) -> None:
    """Register ``worker`` without a status, so the controller asks it: the one way a
    speed of 0 gets in since a registration claiming 0 is refused (a child controller
    with no worker left answers 0)."""
    await post(http, controller, "/register_worker", register_body(worker, status=False))


async def test_speed_zero_worker_is_picked_last_without_error(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A speed-0 worker never causes an error and gets work only when nobody else serves."""
    slow = await make_worker(speed=0)
    await register_probed(http, controller, slow)
    await register(http, controller, W2, speed=1, queue=50)
    assert await pick(http, controller) == W2
    await post(http, controller, "/unregister_worker", {"worker_name": W2})
    assert await pick(http, controller) == slow.url


async def test_stream_to_a_speed_zero_worker_succeeds(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """The only worker reporting speed 0 still serves streams (FastChat divides by zero)."""
    worker = await make_worker(speed=0, tokens=2)
    await register_probed(http, controller, worker)
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert r.status == 200
        assert [m["error_code"] for m in split_stream(await r.read())] == [0, 0]


# -- lottery -----------------------------------------------------------------------------


async def lottery_controller(run_controller: RunController, seed: int = 0) -> Controller:
    return await run_controller(config(dispatch_method="lottery"), rng=random.Random(seed))


async def test_lottery_picks_in_proportion_to_speed(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """lottery picks each worker with probability speed / sum(speeds), never a speed-0 one."""
    controller = await lottery_controller(run_controller)
    idle = await make_worker(speed=0)
    await register(http, controller, W1, speed=1, queue=0)
    await register_probed(http, controller, idle)
    await register(http, controller, W3, speed=3, queue=0)
    draws = 2000
    picks: list[str] = []
    for _ in range(draws // 100):
        picks += await asyncio.gather(*(pick(http, controller) for _ in range(100)))
    counts = collections.Counter(picks)
    assert counts[idle.url] == 0
    assert counts[W1] + counts[W3] == draws
    # Expected 0.25 with a standard deviation of about 0.01: these bounds are 5 of them.
    assert 0.20 < counts[W1] / draws < 0.30


async def test_lottery_uses_the_injected_random_generator(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Two lottery controllers seeded alike pick the same sequence of workers."""
    sequences = []
    for _ in range(2):
        controller = await lottery_controller(run_controller, seed=42)
        await register(http, controller, W1, speed=1, queue=0)
        await register(http, controller, W3, speed=1, queue=0)
        sequences.append([await pick(http, controller) for _ in range(40)])
    assert sequences[0] == sequences[1]
    assert set(sequences[0]) == {W1, W3}


async def test_lottery_answers_empty_when_speeds_sum_to_zero(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """lottery answers "" when every worker serving the model reports speed 0."""
    controller = await lottery_controller(run_controller)
    for _ in range(2):
        await register_probed(http, controller, await make_worker(speed=0))
    assert await pick(http, controller) == ""
    assert await pick(http, controller, "unknown") == ""


# -- queue accounting --------------------------------------------------------------------


async def test_queue_counts_reported_plus_dispatched_since(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """The load is the last reported queue plus what was handed out since that report."""
    await register(http, controller, W1, speed=1, queue=0)
    await register(http, controller, W2, speed=1, queue=0)
    await post(http, controller, "/receive_heart_beat", {"worker_name": W1, "queue_length": 2})
    await post(http, controller, "/receive_heart_beat", {"worker_name": W2, "queue_length": 3})
    # 2 < 3 -> W1 (now 3); tie -> W1 (now 4); 3 < 4 -> W2 (now 4).
    assert [await pick(http, controller) for _ in range(3)] == [W1, W1, W2]
    assert (queue(controller, W1), queue(controller, W2)) == (4, 4)
    # A report replaces everything counted before it.
    await post(http, controller, "/receive_heart_beat", {"worker_name": W1, "queue_length": 0})
    assert queue(controller, W1) == 0
    assert await pick(http, controller) == W1


async def test_stream_counts_while_running_and_uncounts_when_done(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A relayed stream adds one to its worker while it runs and nothing once it has ended."""
    a = await make_worker(tokens=2, hang_after=1)
    b = await make_worker(tokens=2)
    await post(http, controller, "/register_worker", register_body(a))
    await post(http, controller, "/register_worker", register_body(b))

    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        await r.content.readuntil(b"\0")
        assert (queue(controller, a), queue(controller, b)) == (1, 0)
        # A second stream goes to b while a's is in flight.
        async with http.post(
            f"{controller.url}/worker_generate_stream", json={"model": "m"}
        ) as second:
            assert len(split_stream(await second.read())) == 2
        assert len(b.stream_bodies) == 1
        a.release.set()
        assert [m["error_code"] for m in split_stream(await r.read())] == [0]

    await wait_until(lambda: queue(controller, a) == 0 and queue(controller, b) == 0)
    assert await pick(http, controller) == a.url


@pytest.mark.parametrize(
    ("knobs", "codes"),
    [
        pytest.param({"stream_status": 500}, [50006], id="worker-http-500"),
        pytest.param({"drop_at_once": True}, [50006], id="worker-drops-connection"),
        pytest.param({"tokens": 3, "die_after": 1}, [0, 50006], id="worker-dies-mid-stream"),
    ],
)
async def test_failed_stream_leaves_no_count_behind(
    controller: Controller,
    http: aiohttp.ClientSession,
    make_worker: MakeWorker,
    clock: FakeClock,
    knobs: dict[str, Any],
    codes: list[int],
) -> None:
    """A stream that fails at the worker gives its count back, so dispatch is not skewed."""
    a = await make_worker(**knobs)
    b = await make_worker()
    await post(http, controller, "/register_worker", register_body(a))
    await post(http, controller, "/register_worker", register_body(b))

    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert [m["error_code"] for m in split_stream(await r.read())] == codes
    assert len(a.stream_bodies) == 1

    await wait_until(lambda: queue(controller, a) == 0)
    assert queue(controller, b) == 0
    clock.advance(EJECTION + 1)
    # a and b both at 0: the tie goes to a, which a leaked count would have sent to b.
    assert await pick(http, controller) == a.url


async def test_refused_connection_leaves_no_count_behind(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker, clock: FakeClock
) -> None:
    """A stream to a worker whose port is closed gives its count back."""
    a = await make_worker()
    b = await make_worker()
    await post(http, controller, "/register_worker", register_body(a))
    await post(http, controller, "/register_worker", register_body(b))
    a_url = a.url
    await a.stop()

    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert [m["error_code"] for m in split_stream(await r.read())] == [50006]

    await wait_until(lambda: queue(controller, a_url) == 0)
    clock.advance(EJECTION + 1)
    assert await pick(http, controller) == a_url


async def test_client_leaving_mid_stream_leaves_no_count_behind(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A client that disconnects mid-stream gives the worker's count back once it is gone."""
    a = await make_worker(tokens=3, hang_after=1)
    b = await make_worker()
    await post(http, controller, "/register_worker", register_body(a))
    await post(http, controller, "/register_worker", register_body(b))

    r = await http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"})
    await r.content.readuntil(b"\0")
    assert queue(controller, a) == 1
    r.close()
    await asyncio.wait_for(a.upstream_gone.wait(), 2)

    await wait_until(lambda: queue(controller, a) == 0)
    assert await pick(http, controller) == a.url


#: bodies, and whether the one-call reading takes them (the rest go to the full reading)
USUAL_AND_NOT = [
    (b'{"model": "m"}', True),
    (b'{"model": "vicuna-7b", "prompt": "hi", "temperature": 0.7, "stop": ["a", "b"]}', True),
    (b'{"model": "m", "affinity_key": null}', True),
    (b'{"model": "a", "model": "b"}', True),
    (b'{"model": "\\u00e9t\\u00e9"}', True),
    (b'  {"model": "m"}\n', True),
    (b'{"model": "m", "x": {"y": [1, 2, {"z": null}]}}', True),
    (b'{"model": "m", "affinity_key": "user-1"}', False),
    (b'{"model": "m", "affinity_key": 5}', False),
    (b'{"model": 5}', False),
    (b'{"model": null}', False),
    (b'{"prompt": "no model"}', False),
    (b"[1, 2]", False),
    (b'"m"', False),
    (b"", False),
    (b"{not json", False),
    (b'{"model": "m"} trailing', False),
    (b'{"model": "m", "t": NaN}', False),
    (b'{"model": "m", "big": 1e999}', True),  # json.loads takes it too (inf)
    (b'{"model": "\\ud800"}', False),
    (b'\xef\xbb\xbf{"model": "m"}', False),
    (b'{"model": "m", "deep": ' + b"[" * 70 + b"]" * 70 + b"}", False),
    (b'{"model": "m", "pad": "' + b"x" * 20000 + b'"}', False),
]


@pytest.mark.parametrize(("raw", "taken"), USUAL_AND_NOT)
def test_the_usual_dispatch_body_reads_as_the_full_reading_does(raw: bytes, taken: bool) -> None:
    """/get_worker_address reads a usual body ({"model": ...}, no affinity key) in one
    msgspec call: what that takes comes out as the full reading (Python's json's values,
    every refusal named) has it; anything else (another shape, something only Python's
    json takes, a refusal, a large body) is left to the full reading."""
    try:
        full: Any = protocol.parse_dispatch(read(raw, protocol.DISPATCH))
    except BadRequestError as e:
        full = e
    usual = read_as(raw, protocol.USUAL_DISPATCH)
    assert (usual is not None) == taken
    if usual is not None:
        assert full == (usual.model, None)
