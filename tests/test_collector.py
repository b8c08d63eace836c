"""Full garbage collections run by the controller at calm moments (controller.upkeep.collector).

A fake collector and clock drive the timing rules; the real :mod:`gc` shows that, once
taken over, Python starts no full collection however much is allocated, and gets its
thresholds back at the end.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from controller.upkeep import collector as module
from controller.upkeep.collector import (
    CALM,
    FULL_AFTER,
    LONGEST_WAIT,
    MAX_SHARE,
    MIDDLE_EVERY,
    NEVER,
    FullCollections,
)


class FakeGC:
    """Counts like :mod:`gc`: ``middle`` collections so far, ``since_full`` of them since
    the last full one, ``oldest`` objects in the oldest generation (``looked`` times
    listed); a full collection takes ``length`` seconds of the fake clock."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.threshold = (700, 10, 10)
        self.middle = 0
        self.since_full = 0
        self.full = 0
        self.length = 0.0
        self.oldest = 1000
        self.looked = 0

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, threshold0: int, threshold1: int = 10, threshold2: int = 10) -> None:
        self.threshold = (threshold0, threshold1, threshold2)

    def get_count(self) -> tuple[int, int, int]:
        return (0, 0, self.since_full)

    def get_objects(self, generation: int | None = None) -> list[Any]:
        assert generation == 2
        self.looked += 1
        return [None] * self.oldest

    def get_stats(self) -> list[dict[str, Any]]:
        return [{"collections": 0}, {"collections": self.middle}, {"collections": self.full}]

    def collect(self, generation: int = 2) -> int:
        assert generation == 2
        self.clock[0] += self.length
        self.full += 1
        self.since_full = 0
        return 0

    def allocate(self, middle_collections: int, kept: int | None = None) -> None:
        """``middle_collections`` happen, and ``kept`` objects reach the oldest generation
        (by default, 100 per middle collection)."""
        self.middle += middle_collections
        self.since_full += middle_collections
        self.oldest += 100 * middle_collections if kept is None else kept


def fake() -> tuple[FakeGC, FullCollections, list[float]]:
    clock = [100.0]
    collector = FakeGC(clock)
    return collector, FullCollections(collector=collector, clock=lambda: clock[0]), clock


def test_a_due_collection_waits_while_busy_and_runs_when_calm() -> None:
    collector, full, clock = fake()
    for _ in range(FULL_AFTER // (CALM + 3) + 2):  # a burst: many middle collections a second
        clock[0] += 1
        collector.allocate(CALM + 3)
        assert not full.check()
    assert collector.full == 0 and collector.since_full >= FULL_AFTER
    clock[0] += 1  # the burst is over: at most CALM middle collections since the last look
    collector.allocate(CALM)
    assert full.check()
    assert (collector.full, full.collections, full.forced) == (1, 1, 0)


def test_nothing_runs_before_python_would_have_considered_it() -> None:
    collector, full, clock = fake()
    collector.allocate(FULL_AFTER - 1)
    for _ in range(3):
        clock[0] += 1
        assert not full.check()
    collector.allocate(1)
    clock[0] += 1
    assert full.check()
    assert collector.full == 1


def test_a_long_burst_gets_its_collection_after_the_longest_wait() -> None:
    collector, full, clock = fake()
    collector.allocate(FULL_AFTER)
    seconds = 0
    while not full.check():
        clock[0] += 1
        seconds += 1
        collector.allocate(CALM + 1)
        assert seconds <= LONGEST_WAIT + 1
    assert seconds >= LONGEST_WAIT
    assert (collector.full, full.forced) == (1, 1)


def test_full_collections_take_at_most_their_share_of_the_time() -> None:
    collector, full, clock = fake()
    collector.length = 0.05
    collector.allocate(FULL_AFTER)
    assert not full.check()  # busy
    clock[0] += 1
    assert full.check()
    ended = clock[0]
    collector.allocate(FULL_AFTER)
    # calm and due by the count, but not spaced enough after a 50 ms collection
    while clock[0] + 1 < ended + collector.length / MAX_SHARE:
        clock[0] += 1
        assert not full.check()
    clock[0] += 1
    assert full.check()
    assert collector.full == 2


def test_a_heap_that_has_not_grown_by_a_quarter_is_not_walked_again() -> None:
    """With 10,000 objects in the oldest generation, FULL_AFTER middle collections that
    leave 2,500 more (a quarter) run no full collection, and the oldest generation is not
    listed again until FULL_AFTER more have happened; once more than a quarter is new,
    one runs, and the next is measured against what it kept."""
    clock = [100.0]
    collector = FakeGC(clock)
    collector.oldest = 10_000
    full = FullCollections(collector=collector, clock=lambda: clock[0])
    collector.allocate(FULL_AFTER, kept=2_500)
    clock[0] += 1
    looked = collector.looked
    assert not full.check()
    assert collector.looked == looked + 1
    collector.allocate(FULL_AFTER - 1, kept=1)
    clock[0] += 1
    assert not full.check()
    assert collector.looked == looked + 1  # not listed again before FULL_AFTER more
    collector.allocate(1, kept=0)
    clock[0] += 1
    assert full.check()
    assert collector.full == 1
    collector.allocate(FULL_AFTER, kept=collector.oldest // 4)  # 12,501 kept: not enough
    clock[0] += 1
    assert not full.check()
    assert collector.full == 1


async def test_start_takes_the_full_collections_over_and_stop_gives_them_back() -> None:
    clock = [0.0]
    collector = FakeGC(clock)
    looks: list[float] = []
    woken = asyncio.Event()

    async def sleep(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) > 3:
            woken.set()
            await asyncio.Event().wait()  # until cancelled

    full = FullCollections(collector=collector, clock=lambda: clock[0], sleep=sleep)
    full.start()
    collector.allocate(FULL_AFTER)  # before the first look
    assert collector.threshold == (700, MIDDLE_EVERY, NEVER)
    await woken.wait()
    assert collector.full == 1  # the first look found it due and calm
    await full.stop()
    assert collector.threshold == (700, 10, 10)
    assert looks == [module.CHECK_EVERY] * 4


async def test_the_oldest_generation_is_measured_when_the_collections_are_taken_over() -> None:
    """Made while the start-up objects are still in the oldest generation (10,000), started
    once they are frozen out of it (none left): the first calm look after 500 objects
    reached it runs a full collection, growth measured from the start, not from the 10,000."""
    clock = [0.0]
    collector = FakeGC(clock)
    collector.oldest = 10_000

    async def never(seconds: float) -> None:
        await asyncio.Event().wait()

    full = FullCollections(collector=collector, clock=lambda: clock[0], sleep=never)
    collector.oldest = 0  # cli.settle_heap: gc.freeze()
    full.start()
    try:
        collector.allocate(FULL_AFTER, kept=500)
        clock[0] += 1
        assert not full.check()  # due, but that second was busy
        clock[0] += 1
        assert full.check()  # calm
        assert collector.full == 1
    finally:
        await full.stop()


@pytest.mark.usefixtures("restore_gc")
async def test_python_starts_no_full_collection_once_taken_over() -> None:
    """Taken over, Python starts no full collection however much is allocated, here cycles
    kept until they reached the oldest generation (more than a quarter of what it held),
    then dropped; the look after that busy second waits, the next, calm, runs one."""
    generations: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    async def never(seconds: float) -> None:
        await asyncio.Event().wait()

    full = FullCollections(sleep=never)
    gc.callbacks.append(seen)
    try:
        full.start()
        assert gc.get_threshold()[2] == NEVER
        # Cycles kept long enough to reach the oldest generation, more than a quarter of
        # what it holds, then dropped: garbage only a full collection frees.
        old = len(gc.get_objects(2)) // 4 + 10_000
        kept: list[Any] = []
        garbage = []
        young, middle_every = gc.get_threshold()[:2]
        for i in range(max(4 * FULL_AFTER * young * middle_every, old + 100_000)):
            cycle: list[Any] = []
            cycle.append(cycle)
            if i < old:
                kept.append(cycle)
                continue
            garbage.append(cycle)
            if len(garbage) > 1000:
                garbage.clear()
        del kept
        middle = generations.count(1)
        assert middle >= FULL_AFTER  # Python would have run full ones by now
        assert 2 not in generations
        assert gc.get_count()[2] >= FULL_AFTER
        assert not full.check()  # due, but that second was busy
        assert full.check()  # nothing allocated since: calm, so it runs one
        assert generations[-1] == 2
    finally:
        gc.callbacks.remove(seen)
        await full.stop()


@pytest.fixture
def restore_gc() -> Any:
    saved = gc.get_threshold()
    yield
    assert gc.get_threshold() == saved  # stop() gave them back
    gc.set_threshold(*saved)
