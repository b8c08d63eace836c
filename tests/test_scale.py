"""A registry of 20,000 workers: the sweep removes a silent fleet in slices while the loop
keeps running, dispatch never picks a worker waiting for its slice, the listeners (change
feed, state file, parent link) stay consistent and cheap, and least_time decides on a few
workers drawn at random instead of walking the model's fleet.

Time bounds (the loop held at most 100 ms, 1 ms per dispatch at 1,000 workers) are measured
by ``benchmarks/scale.py``; these tests pin the structure that gives them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from controller import Controller, ControllerConfig
from controller.decisions.changes import MEMBERSHIP, ChangeKind
from controller.decisions.dispatch import LEAST_TIME_SCAN
from controller.decisions.models import DispatchMethod, WorkerInfo
from controller.decisions.registry import Registry, Worker
from controller.decisions.routing import Router
from controller.sharing import parent, state
from controller.sharing.parent import ParentLink
from controller.sharing.state import StateFile
from controller.upkeep.expiry import LOGGED_REMOVALS, SWEEP_SLICE, sweep

from .conftest import FakeClock, RunController, wait_until

EXPIRATION = 90.0
FLEET = 20_000
MODELS = 100


def address(n: int) -> str:
    return f"http://10.{n // 65536}.{n // 256 % 256}.{n % 256}:21002"


def fill(registry: Registry, first: int, count: int, models: int = MODELS) -> list[str]:
    """Register ``count`` workers straight into the registry, spread over ``models``."""
    names = [address(n) for n in range(first, first + count)]
    for i, name in enumerate(names):
        registry.register(WorkerInfo(name, (f"m{i % models}",), 1, True), 0)
    return names


class Turns:
    """A task that runs once per turn of the loop until stopped, calling ``on_turn``."""

    def __init__(self, on_turn: Callable[[], None]) -> None:
        self.on_turn = on_turn
        self.turns = 0
        self._stop = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop:
            self.on_turn()
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop = True
        await self._task


def steps(sizes: list[int]) -> Iterator[int]:
    return (a - b for a, b in itertools.pairwise(sizes))


async def test_a_fleet_expiring_together_is_removed_in_slices_while_the_loop_runs(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 workers over 100 models go silent together: the sweep removes them all, a
    slice at a time, with another task running between every two slices; a worker that
    sends a heartbeat while its slice waits is dropped once (its heartbeat finds it
    expired), one that registers again stays; the feed holds one removal per worker; the
    log holds a dozen lines, not 20,000."""
    registry = Registry(EXPIRATION, clock)
    silent = fill(registry, 0, FLEET)
    clock.advance(EXPIRATION - 1)
    alive = fill(registry, FLEET, 100)
    clock.advance(2)
    changes = registry.feed.subscribe(MEMBERSHIP)
    late_beat, comes_back = silent[-1], silent[-2]

    sizes: list[int] = []

    def look() -> None:
        if not sizes:
            # While the first slice is done and the last ones wait.
            assert not registry.heartbeat(late_beat, 0)
            registry.register(WorkerInfo(comes_back, ("m0",), 1, True), 0)
        sizes.append(len(registry))

    caplog.set_level(logging.INFO, logger="controller")
    turns = Turns(look)
    removed = await sweep(registry)
    await turns.stop()
    sizes.append(len(registry))

    survivors = set(alive) | {comes_back}
    assert {w.name for w in registry} == survivors
    assert len(registry) == len(survivors)
    assert len(removed) == FLEET - 2
    # Each worker here is two index entries (itself and its model): the other task ran
    # after every slice, and no slice removed more than its budget.
    most = SWEEP_SLICE // 2
    assert len(sizes) >= FLEET // most
    assert max(steps(sizes)) <= most

    taken = changes.take()
    assert taken is not None
    gone = [c for c in taken if c.kind is ChangeKind.REMOVED]
    assert collections.Counter(c.info.name for c in gone) == collections.Counter(
        set(silent) - {comes_back}
    )
    assert {c.reason for c in gone} == {"expired"}
    versions = [c.version for c in taken]
    assert versions == sorted(versions)
    by_name = {c.info.name: c.version for c in gone}
    assert all(w.version == by_name[w.name] for w in removed)

    lines = [r.getMessage() for r in caplog.records if r.name == "controller.upkeep.expiry"]
    assert len(lines) == LOGGED_REMOVALS + 1
    assert f"{FLEET - 2} removed in all" in lines[-1]


@pytest.mark.parametrize("method", list(DispatchMethod))
async def test_dispatch_never_returns_a_worker_waiting_for_its_slice(
    clock: FakeClock, method: DispatchMethod
) -> None:
    """While a sweep works through a silent fleet, every method picks only live workers:
    for a model whose fleet is mostly silent (least_time's draw finds too few live ones
    and looks at all) and for one mostly alive (the draw decides)."""
    registry = Registry(EXPIRATION, clock)
    router = Router(registry, method, rng=random.Random(7))
    # m0: 1,500 silent workers and 20 live ones; m1: 1,500 silent and 2,000 live.
    silent = set(fill(registry, 0, 3000, models=2))
    clock.advance(EXPIRATION - 1)
    alive = set(fill(registry, 3000, 20, models=1))
    alive |= {w.name for w in fill_models(registry, 4000, 2000, "m1")}
    clock.advance(2)

    picked: list[str] = []

    def look() -> None:
        for model in ("m0", "m1"):
            worker = router.dispatch(model, by_address=True)
            assert worker is not None
            picked.append(worker.name)

    turns = Turns(look)
    await sweep(registry, budget=64)
    await turns.stop()

    # 32 workers a slice: the other task dispatched between every two of ~94 slices.
    assert turns.turns >= 90
    assert set(picked) <= alive
    assert not set(picked) & silent
    assert all(registry.get(name) is None for name in silent)


def fill_models(registry: Registry, first: int, count: int, model: str) -> list[Worker]:
    return [
        registry.register(WorkerInfo(address(n), (model,), 1, True), 0)[0]
        for n in range(first, first + count)
    ]


async def test_the_state_file_lists_the_survivors_and_is_encoded_off_the_loop(
    clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver, following the feed through a sliced sweep of 20,000 workers, ends with
    a file holding exactly the survivors; no save lists a worker already expired; the
    file is encoded in a worker thread, never on the loop's."""
    encoders: list[threading.Thread] = []
    encode = state.encode

    def spy(rows: list[state.Row], wall_now: float) -> bytes:
        encoders.append(threading.current_thread())
        return encode(rows, wall_now)

    monkeypatch.setattr(state, "encode", spy)
    registry = Registry(EXPIRATION, clock, max_workers=None)
    path = tmp_path / "state.json"
    saver = StateFile(str(path), registry, wall_clock=lambda: 1e9)
    fill(registry, 0, FLEET)
    clock.advance(EXPIRATION - 1)
    alive = set(fill(registry, FLEET, 50))
    clock.advance(2)
    task = asyncio.create_task(saver.save_forever())
    try:
        mid_sweep: list[set[str]] = []
        pauses = 0

        async def save_between_slices() -> None:
            nonlocal pauses
            pauses += 1
            if pauses % 16 == 1:
                await saver.save()
                mid_sweep.append(saved_names(path))

        await sweep(registry, pause=save_between_slices)
        await wait_until(lambda: path.exists() and saved_names(path) == alive, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(mid_sweep) > 1
    assert all(names == alive for names in mid_sweep)
    assert encoders
    assert threading.main_thread() not in encoders


def saved_names(path: Path) -> set[str]:
    return {w.name for w in state.load(path.read_bytes(), 1e9)}


async def test_a_child_reads_its_offer_once_after_its_fleet_expired_in_slices(
    run_controller: RunController, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent link follows the child's registry: while 2,000 workers expire in 1,000
    slices it does not read the registry (a whole pass of it each time), and once the
    burst has settled it reads it once and tells the parent the final speed."""
    settle = asyncio.Event()
    settled = parent._settle

    async def gate() -> None:
        await settle.wait()
        await settled()

    offers = 0
    offer = ParentLink.offer

    def counted(link: ParentLink) -> tuple[tuple[str, ...], float]:
        nonlocal offers
        offers += 1
        return offer(link)

    monkeypatch.setattr(parent, "_settle", gate)
    monkeypatch.setattr(ParentLink, "offer", counted)
    upper = await run_controller()
    child = await run_controller(
        ControllerConfig(
            host="127.0.0.1",
            port=0,
            parent_controller=upper.url,
            parent_heart_beat_interval=30,
            heart_beat_expiration=EXPIRATION,
        ),
        clock=clock,
    )
    settle.set()
    fill(child.registry, 0, 2000)
    clock.advance(EXPIRATION - 1)
    fill(child.registry, 2000, 1)
    await wait_until(lambda: speed_at(upper, child) == 2001)
    settle.clear()
    clock.advance(2)
    before = offers

    await sweep(child.registry, budget=4)

    assert len(child.registry) == 1
    assert offers == before
    settle.set()
    await wait_until(lambda: speed_at(upper, child) == 1)
    assert offers == before + 1


def speed_at(upper: Controller, child: Controller) -> float | None:
    entry = upper.registry.get(child.url)
    return entry.info.speed if entry is not None else None


async def test_least_time_in_a_large_fleet_decides_on_a_draw_not_the_whole_fleet(
    run_controller: RunController, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """With 1,000 workers serving a model (and 19,000 serving others), each least_time
    decision is made among 64 of them drawn at random, as /dispatch_decisions shows, and
    the draws reach every worker of the model."""
    controller = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, max_workers=FLEET, load_poll_interval=0),
        clock=clock,
        rng=random.Random(3),
    )
    registry = controller.registry
    fill(registry, 0, 19_000, models=MODELS)
    fleet = {w.name for w in fill_models(registry, FLEET, 1000, "big")}

    chosen: collections.Counter[str] = collections.Counter()
    for _ in range(3000):
        worker = controller.router.dispatch("big", by_address=True)
        assert worker is not None
        chosen[worker.name] += 1
    async with http.get(f"{controller.url}/dispatch_decisions?n=100") as r:
        decisions = (await r.json())["decisions"]

    assert {d["candidate_count"] for d in decisions} == {LEAST_TIME_SCAN}
    assert all(c["worker"] in fleet for d in decisions for c in d["candidates"])
    # Alike but for the requests counted against them, the least loaded of each draw
    # gets the request: the draws spread the load over nearly every worker.
    assert len(chosen) > 900
    assert set(chosen) <= fleet


@pytest.mark.parametrize("size", [100, 1000])
def test_draws_are_uniform_and_in_registration_order(clock: FakeClock, size: int) -> None:
    """A draw holds distinct workers of the model, in registration order, and over many
    draws each worker is drawn about as often as any other (a fleet less than twice the
    draw and a larger one are drawn from differently)."""
    registry = Registry(EXPIRATION, clock)
    fill(registry, 0, size, models=1)
    order = {w.name: i for i, w in enumerate(registry)}
    rng = random.Random(11)
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(2000):
        drawn = registry.candidates("m0", (), clock(), LEAST_TIME_SCAN, 1, rng)
        positions = [order[w.name] for w in drawn]
        assert positions == sorted(set(positions))
        assert len(positions) == LEAST_TIME_SCAN
        counts.update(w.name for w in drawn)
    expected = 2000 * LEAST_TIME_SCAN / size
    assert len(counts) == size
    assert expected * 0.6 < min(counts.values()) <= max(counts.values()) < expected * 1.4
