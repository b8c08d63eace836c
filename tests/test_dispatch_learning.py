"""Dispatch between heartbeats: learned service times, retirement on time, load polls,
the time-based policies, affinity, and the decision log."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig, DispatchMethod

from .conftest import FakeClock, MakeWorker, RunController, register_body


def status(queue: int = 0, speed: float = 1, models: list[str] | None = None) -> dict[str, Any]:
    return {"model_names": models or ["m"], "speed": speed, "queue_length": queue}


async def call(http: aiohttp.ClientSession, controller: Controller, path: str, body: Any) -> Any:
    async with http.post(f"{controller.url}{path}", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def register(
    http: aiohttp.ClientSession, controller: Controller, name: str, **kw: Any
) -> None:
    body = {"worker_name": name, "check_heart_beat": True, "worker_status": status(**kw)}
    await call(http, controller, "/register_worker", body)


def cfg(**kwargs: Any) -> ControllerConfig:
    kwargs.setdefault("load_poll_interval", 0)
    return ControllerConfig(host="127.0.0.1", port=0, **kwargs)


async def test_heartbeats_teach_service_time_by_littles_law(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """Two reports of requests this controller did not send give the worker's time per
    request by Little's law."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1", queue=4)
    clock.advance(10)
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 2}
    await call(http, controller, "/receive_heart_beat", beat)

    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    # It held 3 on average and finished 4 - 2 = 2 in 10 s: 3 * 10 / 2 seconds each.
    assert info.load.service_time == pytest.approx(15.0)


async def test_requests_handed_out_by_address_retire_after_service_time(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A /get_worker_address dispatch stops counting once the learned service time passed."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    info.load.learn_service_time(3.0, controller.registry.clock())

    await call(http, controller, "/get_worker_address", {"model": "m"})
    clock.advance(2.9)
    assert [w.queue_length for w in controller.registry.candidates("m")] == [1]
    clock.advance(0.2)
    assert [w.queue_length for w in controller.registry.candidates("m")] == [0]


async def test_without_evidence_handed_out_requests_wait_for_a_report(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """With no service time known anywhere, a dispatch counts until the worker reports."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    await call(http, controller, "/get_worker_address", {"model": "m"})
    clock.advance(60)
    assert [w.queue_length for w in controller.registry.candidates("m")] == [1]


async def test_relayed_stream_teaches_service_time(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A completed relayed stream's duration becomes the worker's first service-time estimate."""
    controller = await run_controller(cfg())
    worker = await make_worker(tokens=3, token_delay=0.05)
    await call(http, controller, "/register_worker", register_body(worker))
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        await r.read()

    info = controller.registry.get(worker.url)
    assert info is not None
    assert info.load.service_time is not None
    assert 0.15 <= info.load.service_time < 2.0


async def test_least_time_prefers_faster_worker_over_shorter_queue(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """least_time sends work to a busier fast worker rather than an idle one 4x slower."""
    controller = await run_controller(cfg(dispatch_method="least_time"))
    await register(http, controller, "http://127.0.0.1:1", queue=0)
    await register(http, controller, "http://127.0.0.1:2", queue=2)
    slow, fast = controller.registry.candidates("m")
    slow.load.learn_service_time(0.8, controller.registry.clock())
    fast.load.learn_service_time(0.2, controller.registry.clock())

    answer = await call(http, controller, "/get_worker_address", {"model": "m"})

    # Expected finish: slow (0 + 1) * 0.8 = 0.8 s; fast (2 + 1) * 0.2 = 0.6 s.
    assert answer == {"address": "http://127.0.0.1:2"}


async def test_shortest_queue_keeps_fastchat_meaning(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """shortest_queue still compares queue/speed, whatever service times were learned."""
    controller = await run_controller(cfg(dispatch_method="shortest_queue"))
    await register(http, controller, "http://127.0.0.1:1", queue=0)
    await register(http, controller, "http://127.0.0.1:2", queue=2)
    slow, fast = controller.registry.candidates("m")
    slow.load.learn_service_time(0.8, controller.registry.clock())
    fast.load.learn_service_time(0.2, controller.registry.clock())

    answer = await call(http, controller, "/get_worker_address", {"model": "m"})

    assert answer == {"address": "http://127.0.0.1:1"}


async def test_power_of_two_never_picks_the_worst_of_three(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Power of two choices compares two random workers, so the worst of three never wins."""
    controller = await run_controller(cfg(dispatch_method="power_of_two"), rng=random.Random(7))
    for port, queue in ((1, 0), (2, 1), (3, 5)):
        await register(http, controller, f"http://127.0.0.1:{port}", queue=queue)

    picks = Counter(
        worker.name
        for _ in range(300)
        if (worker := controller.router.dispatch("m", count=False)) is not None
    )

    assert set(picks) == {"http://127.0.0.1:1", "http://127.0.0.1:2"}
    # Worker 1 wins both pairs it is in (2 of 3 pairs), worker 2 the remaining one.
    assert 150 < picks["http://127.0.0.1:1"] < 250


async def test_affinity_returns_to_the_same_worker_until_it_is_overloaded(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Requests with one affinity_key stick to one worker, and move when it is overloaded."""
    controller = await run_controller(cfg(dispatch_method="shortest_queue"))
    await register(http, controller, "http://127.0.0.1:1")
    await register(http, controller, "http://127.0.0.1:2")
    ask = {"model": "m", "affinity_key": "conversation-42"}

    first = (await call(http, controller, "/get_worker_address", ask))["address"]
    # The same key follows its worker although it is now busier than the other.
    again = (await call(http, controller, "/get_worker_address", ask))["address"]
    assert again == first
    # Load the chosen worker until it is expected to take over twice as long as the other.
    beat = {"worker_name": first, "queue_length": 6}
    await call(http, controller, "/receive_heart_beat", beat)
    moved = (await call(http, controller, "/get_worker_address", ask))["address"]
    assert moved != first
    assert (await call(http, controller, "/get_worker_address", ask))["address"] == moved


async def test_affinity_in_a_fleet_larger_than_the_sample_still_sticks_and_gives_way(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With more workers than least_time scans at once (64), a key still returns to its
    worker, and still leaves it once it is loaded far beyond the rest."""
    controller = await run_controller(cfg())
    for port in range(1, 101):
        await register(http, controller, f"http://127.0.0.1:{port}")
    ask = {"model": "m", "affinity_key": "conversation-7"}
    first = (await call(http, controller, "/get_worker_address", ask))["address"]
    for _ in range(3):
        assert (await call(http, controller, "/get_worker_address", ask))["address"] == first
    beat = {"worker_name": first, "queue_length": 40}
    await call(http, controller, "/receive_heart_beat", beat)
    assert (await call(http, controller, "/get_worker_address", ask))["address"] != first


async def test_affinity_key_must_be_a_string(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A non-string affinity_key is a 400 naming the field."""
    controller = await run_controller(cfg())
    async with http.post(
        f"{controller.url}/get_worker_address", json={"model": "m", "affinity_key": 5}
    ) as r:
        assert r.status == 400
        assert (await r.json())["field"] == "affinity_key"


async def test_decisions_endpoint_explains_recent_dispatches(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """/dispatch_decisions lists the last decisions with candidates, estimates and choice."""
    controller = await run_controller(cfg())
    await register(http, controller, "http://127.0.0.1:1", queue=3)
    await register(http, controller, "http://127.0.0.1:2", queue=1)
    await call(http, controller, "/get_worker_address", {"model": "m"})
    await call(http, controller, "/get_worker_address", {"model": "other"})

    async with http.get(f"{controller.url}/dispatch_decisions?n=2") as r:
        decisions = (await r.json())["decisions"]

    assert [d["model"] for d in decisions] == ["m", "other"]
    first, second = decisions
    assert first["chosen"] == "http://127.0.0.1:2"
    assert first["method"] == "least_time"
    assert [(c["worker"], c["queue_length"]) for c in first["candidates"]] == [
        ("http://127.0.0.1:1", 3),
        ("http://127.0.0.1:2", 1),
    ]
    assert second["chosen"] is None
    assert second["candidates"] == []
    async with http.get(f"{controller.url}/dispatch_decisions?n=x") as r:
        assert r.status == 400


async def test_load_poll_refreshes_busy_workers_queue(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A load poll replaces the estimate of a worker that got work with what it says now."""
    controller = await run_controller(cfg())
    busy = await make_worker(queue_length=0)
    idle = await make_worker(queue_length=0)
    await call(http, controller, "/register_worker", register_body(busy))
    await call(http, controller, "/register_worker", register_body(idle))
    await call(http, controller, "/get_worker_address", {"model": "m"})
    busy.queue_length = 4
    idle.queue_length = 9
    calls_before = idle.status_calls

    assert await controller.prober.poll_load() == 1

    queues = {w.name: w.queue_length for w in controller.registry}
    # The busy worker's own number replaced the estimate; the idle one was not asked.
    assert queues == {busy.url: 4, idle.url: 0}
    assert idle.status_calls == calls_before


async def test_load_poll_backs_off_from_a_worker_that_does_not_answer(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A worker failing its load poll is not polled again at once."""
    controller = await run_controller(cfg(load_poll_interval=1.0, status_probe_timeout=0.5))
    await register(http, controller, "http://127.0.0.1:9")
    await call(http, controller, "/get_worker_address", {"model": "m"})
    info = controller.registry.get("http://127.0.0.1:9")
    assert info is not None
    info.load.reported_at -= 10

    assert await controller.prober.poll_load() == 0
    assert info.poll_failures == 1
    assert info.next_poll_at > controller.registry.clock()
    # Not due yet: nothing is asked.
    assert await controller.prober.poll_load() == 0
    assert info.poll_failures == 1


def test_every_policy_is_a_cli_choice() -> None:
    """Each dispatch policy can be chosen from the command line."""
    from controller.cli import build_parser

    help_text = build_parser().format_help()
    for method in DispatchMethod:
        assert method.value in help_text


async def test_worker_slots_let_least_time_use_a_free_slot(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """With --worker-slots, a busy fast worker with a free slot beats an idle slow one."""
    controller = await run_controller(cfg(dispatch_method="least_time", worker_slots=4))
    await register(http, controller, "http://127.0.0.1:1", queue=0)
    await register(http, controller, "http://127.0.0.1:2", queue=3)
    slow, fast = controller.registry.candidates("m")
    slow.load.learn_service_time(0.8, controller.registry.clock())
    fast.load.learn_service_time(0.2, controller.registry.clock())

    answer = await call(http, controller, "/get_worker_address", {"model": "m"})

    # One at a time the fast worker would need (3 + 1) * 0.2 = 0.8 s, a tie; with four
    # slots it has one free: 0.2 * (1 + 3 / 4) = 0.35 s.
    assert answer == {"address": "http://127.0.0.1:2"}


async def test_reported_queue_is_presumed_finished_over_one_service_time(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A reported queue does not stay counted until the next report: it drains over one
    service time, so a stale report cannot make a busy worker look twice as busy."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    info.load.learn_service_time(2.0, controller.registry.clock())
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 4}
    await call(http, controller, "/receive_heart_beat", beat)

    def queue() -> int:
        (worker,) = controller.registry.candidates("m")
        return worker.queue_length

    assert queue() == 4
    clock.advance(1.0)
    assert queue() == 2
    clock.advance(1.1)
    assert queue() == 0


async def test_idle_time_before_the_first_request_is_not_service_time(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A worker idle since its last report is observed from its first request on."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1", queue=0)
    clock.advance(60)
    for _ in range(4):
        await call(http, controller, "/get_worker_address", {"model": "m"})
    clock.advance(2)
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 2}
    await call(http, controller, "/receive_heart_beat", beat)

    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    # Sent together 2 s ago; two finished, two are still there: 2 s each (counting the 60
    # idle seconds would make it 62 s).
    assert info.load.service_time == pytest.approx(2.0)


async def test_overlong_affinity_key_is_refused(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """An affinity_key longer than 256 characters is a 400 naming the field."""
    controller = await run_controller(cfg())
    body = {"model": "m", "affinity_key": "k" * 257}
    async with http.post(f"{controller.url}/get_worker_address", json=body) as r:
        assert r.status == 400
        assert (await r.json())["field"] == "affinity_key"


async def test_one_poll_brackets_service_time_by_which_requests_finished(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A single report after a few dispatches gives the service time: the oldest requests
    are the ones that finished, so the send times around the cut bracket it."""
    controller = await run_controller(cfg(), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    for _ in range(4):
        await call(http, controller, "/get_worker_address", {"model": "m"})
        clock.advance(0.1)
    # Sent at 0.0, 0.1, 0.2 and 0.3; at 0.45 two are left, so the two oldest finished.
    clock.advance(0.05)
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 2}
    await call(http, controller, "/receive_heart_beat", beat)

    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    # The one sent at 0.1 took at most 0.35 s; the one sent at 0.2 is still there at 0.25 s.
    assert info.load.service_time == pytest.approx(0.30)


async def test_worker_with_nothing_finished_is_not_assumed_as_fast_as_the_others(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A worker still holding every request sent to it is known to take at least as long
    as they have been there, and loses to a known-fast worker with more in flight."""
    controller = await run_controller(cfg(dispatch_method="least_time"), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    await register(http, controller, "http://127.0.0.1:2")
    fast, unknown = controller.registry.candidates("m")
    fast.load.learn_service_time(0.2, controller.registry.clock())
    assert controller.router.dispatch("m", by_address=True) is fast
    assert controller.router.dispatch("m", by_address=True) is unknown
    assert controller.router.dispatch("m", by_address=True) is fast
    clock.advance(0.6)
    # The fast worker still has two (it is told nothing new); the other still has its one.
    await call(
        http, controller, "/receive_heart_beat", {"worker_name": fast.name, "queue_length": 2}
    )
    await call(
        http, controller, "/receive_heart_beat", {"worker_name": unknown.name, "queue_length": 1}
    )

    answer = await call(http, controller, "/get_worker_address", {"model": "m"})

    # Fast: a free slot, 0.2 s. The other: at least 0.6 s, though its queue is shorter.
    assert answer == {"address": fast.name}


async def test_time_waiting_for_a_slot_is_not_learned_as_service_time(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A request sent behind a full round of slots takes two service times; the worker is
    not taken for twice as slow because of it."""
    controller = await run_controller(cfg(worker_slots=2), clock=clock)
    await register(http, controller, "http://127.0.0.1:1", queue=2)
    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    info.load.learn_service_time(0.2, controller.registry.clock())
    await call(http, controller, "/get_worker_address", {"model": "m"})
    await call(http, controller, "/get_worker_address", {"model": "m"})
    # Both waited for the two reported requests (0.2 s), then ran (0.2 s): one is done at
    # 0.45 s, the other not yet (the worker took them in order).
    clock.advance(0.45)
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 1}
    await call(http, controller, "/receive_heart_beat", beat)

    # Bracketed by 0.45 / 2 and 0.45 / 2 per service time: 0.225 s, not 0.45 s.
    assert info.load.service_time == pytest.approx(0.2 + 0.25 * (0.225 - 0.2))


async def test_load_poll_asks_workers_without_a_service_time_more_often(
    run_controller: RunController,
    make_worker: MakeWorker,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    """A worker whose service time is not known yet is polled a quarter interval after its
    last report; a known one waits the whole interval."""
    controller = await run_controller(cfg(load_poll_interval=1.0), clock=clock)
    known = await make_worker()
    unknown = await make_worker()
    await call(http, controller, "/register_worker", register_body(known))
    await call(http, controller, "/register_worker", register_body(unknown))
    info = controller.registry.get(known.url)
    assert info is not None
    info.load.learn_service_time(0.2, controller.registry.clock())
    assert controller.router.dispatch("m", by_address=True) is info
    assert controller.router.dispatch("m", by_address=True) is controller.registry.get(unknown.url)
    calls = (known.status_calls, unknown.status_calls)

    clock.advance(0.3)
    assert await controller.prober.poll_load() == 1

    assert known.status_calls == calls[0]
    assert unknown.status_calls > calls[1]


async def test_a_worker_shunned_for_a_high_estimate_gets_work_again_later(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A worker that looked slow gets no work, so no new evidence; its estimate drifts
    back towards the others' until it is tried again instead of being shunned for good."""
    controller = await run_controller(cfg(dispatch_method="least_time"), clock=clock)
    await register(http, controller, "http://127.0.0.1:1", queue=0)
    await register(http, controller, "http://127.0.0.1:2", queue=1)
    await register(http, controller, "http://127.0.0.1:3", queue=1)
    once_slow, a, b = controller.registry.candidates("m")
    once_slow.load.learn_service_time(0.35, clock())
    a.load.learn_service_time(0.2, clock())
    b.load.learn_service_time(0.2, clock())

    # 0.35 s against 0.2 * (1 + 1/5) = 0.24 s: more than 25% worse, so not chosen.
    assert controller.router.dispatch("m", count=False) is a
    clock.advance(20)
    # Two half-lives later it is 0.25 + 0.1 / 4 = 0.275 s: as good, and idle.
    assert controller.router.dispatch("m", count=False) is once_slow


async def test_least_time_spreads_work_over_workers_equal_but_for_noise(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """Workers whose service times differ by a few percent share the work evenly instead
    of the one that looks fastest taking every request until its slots are full."""
    controller = await run_controller(cfg(dispatch_method="least_time"), clock=clock)
    for port in (1, 2, 3):
        await register(http, controller, f"http://127.0.0.1:{port}")
    for w, seconds in zip(controller.registry.candidates("m"), (0.18, 0.2, 0.22), strict=True):
        w.load.learn_service_time(seconds, clock())

    picks: Counter[str] = Counter()
    for _ in range(6):
        picks[(await call(http, controller, "/get_worker_address", {"model": "m"}))["address"]] += 1

    assert sorted(picks.values()) == [2, 2, 2]


def test_least_time_samples_a_large_fleet() -> None:
    """With more workers than it scans, least_time still finds an idle one among many busy."""
    from controller.decisions.dispatch import LEAST_TIME_SCAN, choose
    from controller.decisions.estimator import LoadEstimate
    from controller.decisions.models import WorkerInfo
    from controller.decisions.registry import Worker

    def worker(i: int, queue: int) -> Worker:
        info = WorkerInfo(f"http://10.0.{i // 256}.{i % 256}:21002", ("m",), 1.0, True)
        return Worker(info, 0.0, load=LoadEstimate(queue_length=queue))

    fleet = [worker(i, 0 if i % 2 else 40) for i in range(4 * LEAST_TIME_SCAN)]
    rng = random.Random(3)
    chosen = [choose(DispatchMethod.LEAST_TIME, fleet, rng, 5) for _ in range(50)]

    assert all(w is not None and w.queue_length == 0 for w in chosen)
    # Each decision looks at a different sample, so the idle workers share the work.
    assert len({id(w) for w in chosen}) > 10


@pytest.mark.parametrize("evidence", ["none", "some", "all"])
@pytest.mark.parametrize("slots", [None, 1, 5])
def test_least_time_picks_what_expected_time_ranks_first(evidence: str, slots: int | None) -> None:
    """least_time's shortcuts pick the worker its documented rule does: among those within
    the tie tolerance of the lowest expected_time, the shortest queue, then the earliest."""
    from controller.decisions.dispatch import (
        TIE_TOLERANCE,
        expected_time,
        least_time,
        prior_service_time,
    )
    from controller.decisions.estimator import LoadEstimate
    from controller.decisions.models import WorkerInfo
    from controller.decisions.registry import Worker

    rng = random.Random(f"{evidence}-{slots}")
    now = 100.0
    for _ in range(300):
        fleet = []
        for i in range(rng.randint(1, 7)):
            learned = {"none": False, "some": rng.random() < 0.5, "all": True}[evidence]
            load = LoadEstimate(
                queue_length=rng.randint(0, 12),
                service_time=rng.uniform(0.05, 3.0) if learned else None,
                service_floor=rng.choice([0.0, 0.0, rng.uniform(0.1, 4.0)]),
                learned_at=now - rng.uniform(0, 30),
            )
            speed = rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, 4.0])
            fleet.append(Worker(WorkerInfo(f"http://w{i}", ("m",), speed, False), 0.0, load=load))
        prior = prior_service_time(fleet)
        times = [expected_time(w, prior, slots, now) for w in fleet]
        bound = min(times) * (1 + TIE_TOLERANCE)
        tied = [
            (w.queue_length, e, i)
            for i, (w, e) in enumerate(zip(fleet, times, strict=True))
            if e <= bound
        ]
        assert least_time(fleet, slots, now) is fleet[min(tied)[2]]


async def test_a_reported_queue_deeper_than_the_slots_drains_a_round_at_a_time(
    run_controller: RunController, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A worker reporting twice as many requests as it has slots is presumed to need two
    service times to get through them, not one."""
    controller = await run_controller(cfg(worker_slots=2), clock=clock)
    await register(http, controller, "http://127.0.0.1:1")
    info = controller.registry.get("http://127.0.0.1:1")
    assert info is not None
    info.load.learn_service_time(1.0, clock())
    beat = {"worker_name": "http://127.0.0.1:1", "queue_length": 4}
    await call(http, controller, "/receive_heart_beat", beat)

    def queue() -> int:
        (worker,) = controller.registry.candidates("m")
        return worker.queue_length

    clock.advance(1.0)
    assert queue() == 2
    clock.advance(1.0)
    assert queue() == 0
