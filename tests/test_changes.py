"""The one place where the registry changes: every mutation reaches the change feed, in
order, with versions; and the per-name lock that keeps a probe's answer from overtaking a
goodbye."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controller import ControllerConfig
from controller.decisions.changes import MEMBERSHIP, ChangeFeed, ChangeKind
from controller.decisions.models import WorkerInfo

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register_body, wait_until


def cfg(**overrides: object) -> ControllerConfig:
    settings: dict[str, object] = {"host": "127.0.0.1", "port": 0, "load_poll_interval": 0}
    settings.update(overrides)
    return ControllerConfig(**settings)  # type: ignore[arg-type]


async def test_every_kind_of_change_reaches_the_feed_in_order(
    run_controller: RunController,
    make_worker: MakeWorker,
    clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    """Register, heartbeat, refresh, unregister and expiry each append one change to the
    feed, with versions that grow and the reason a worker left."""
    controller = await run_controller(cfg(heart_beat_expiration=10), clock=clock)
    feed = controller.registry.feed
    follower = feed.subscribe()
    a = await make_worker(model_names=["m"])
    b = await make_worker(model_names=["m"])

    await post_ok(http, controller, "/register_worker", register_body(a))
    await post_ok(http, controller, "/register_worker", register_body(b))
    beat = {"worker_name": a.url, "queue_length": 2}
    assert await post_ok(http, controller, "/receive_heart_beat", beat) == {"exist": True}
    b.model_names = ["m", "n"]
    await post_ok(http, controller, "/refresh_all_workers")
    await post_ok(http, controller, "/unregister_worker", {"worker_name": a.url})
    clock.advance(11)
    assert [w.name for w in controller.expire_now()] == [b.url]

    changes = follower.take()
    assert changes is not None
    seen = [(c.kind, c.info.name, c.reason) for c in changes]
    assert seen == [
        (ChangeKind.REGISTERED, a.url, "registered"),
        (ChangeKind.REGISTERED, b.url, "registered"),
        (ChangeKind.HEARTBEAT, a.url, ""),
        # The refresh asks both: a still serves what it did, b now serves two models.
        (ChangeKind.LOAD, a.url, ""),
        (ChangeKind.UPDATED, b.url, ""),
        (ChangeKind.REMOVED, a.url, "unregistered"),
        (ChangeKind.REMOVED, b.url, "expired"),
    ]
    versions = [c.version for c in changes]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert versions[-1] == feed.version
    assert changes[2].queue_length == 2
    assert changes[4].info.model_names == ("m", "n")
    assert follower.take() == []


async def test_an_entry_carries_the_version_of_its_last_change(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker's entry knows the version of the newest change to it, so a listener can
    tell an old change from a new one, across re-registrations too."""
    controller = await run_controller(cfg())
    worker = await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(worker))
    entry = controller.registry.get(worker.url)
    assert entry is not None
    first = entry.version
    await post_ok(
        http, controller, "/receive_heart_beat", {"worker_name": worker.url, "queue_length": 0}
    )
    assert entry.version == controller.registry.feed.version > first
    await post_ok(http, controller, "/register_worker", register_body(worker))
    assert entry.version == controller.registry.feed.version > first + 1


async def test_the_state_file_follows_membership_changes_not_heartbeats(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The state file is written when a worker joins, not on every heartbeat: it listens
    to the feed for membership changes only."""
    path = tmp_path / "state.json"
    controller = await run_controller(cfg(state_file=str(path)))
    worker = await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(worker))

    async with asyncio.timeout(5):
        while not path.exists() or worker.url not in path.read_text():
            await asyncio.sleep(0.01)
    membership = controller.registry.feed.subscribe(MEMBERSHIP)
    beat = {"worker_name": worker.url, "queue_length": 1}
    await post_ok(http, controller, "/receive_heart_beat", beat)
    assert membership.take() == []
    await post_ok(http, controller, "/unregister_worker", {"worker_name": worker.url})
    changes = membership.take()
    assert changes is not None
    assert [c.kind for c in changes] == [ChangeKind.REMOVED]


def test_a_listener_that_falls_behind_is_told_to_resynchronise() -> None:
    """A listener further behind than the feed keeps gets ``None`` (read the registry
    afresh), never a silent gap; after that it follows again from the newest change."""
    feed = ChangeFeed(retention=4)
    slow = feed.subscribe()
    info = WorkerInfo("http://10.0.0.1:21002", ("m",), 1.0, True)
    for queue in range(6):
        feed.append(ChangeKind.HEARTBEAT, info, queue, 0.0)
    assert slow.take() is None
    feed.append(ChangeKind.HEARTBEAT, info, 9, 0.0)
    changes = slow.take()
    assert changes is not None
    assert [c.queue_length for c in changes] == [9]


async def test_a_listener_wakes_only_for_the_kinds_it_follows() -> None:
    """A membership listener is not woken by heartbeats, and is by a registration."""
    feed = ChangeFeed()
    listener = feed.subscribe(MEMBERSHIP)
    info = WorkerInfo("http://10.0.0.1:21002", ("m",), 1.0, True)
    waiting = asyncio.create_task(listener.wait())
    feed.append(ChangeKind.HEARTBEAT, info, 0, 0.0)
    await asyncio.sleep(0)
    assert not waiting.done()
    feed.append(ChangeKind.REGISTERED, info, 0, 0.0, "registered")
    await asyncio.wait_for(waiting, 1)
    changes = listener.take()
    assert changes is not None
    assert [c.kind for c in changes] == [ChangeKind.REGISTERED]
    listener.close()
    closed = asyncio.create_task(listener.wait())
    feed.append(ChangeKind.REMOVED, info, 0, 0.0, "unregistered")
    await asyncio.sleep(0)
    assert not closed.done()
    closed.cancel()


async def test_a_goodbye_during_the_registration_probe_is_not_overtaken(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker that registers without a status and says goodbye while the controller is
    still asking it for its status ends up unregistered: the goodbye waits for the
    registration and then removes it, instead of the registration landing after it."""
    controller = await run_controller(cfg())
    worker = await make_worker(status_hang=True)
    register = asyncio.create_task(
        post_ok(http, controller, "/register_worker", register_body(worker, status=False))
    )
    async with asyncio.timeout(5):
        while worker.status_calls == 0:
            await asyncio.sleep(0.005)
    goodbye = asyncio.create_task(
        post_ok(http, controller, "/unregister_worker", {"worker_name": worker.url})
    )
    # The goodbye is held while the probe is under way; the probe then answers.
    await wait_until(lambda: controller.prober.locks.users(worker.url) == 2)
    assert not goodbye.done()
    worker.release.set()

    assert await register is None
    assert await goodbye == {"removed": True}
    assert await post_ok(http, controller, "/list_models") == {"models": []}
    assert controller.registry.get(worker.url) is None


async def test_a_hanging_registration_probe_holds_up_no_other_worker(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """While one worker's registration waits on its status probe, another worker
    registers and unregisters at once: the lock is per worker name."""
    controller = await run_controller(cfg())
    stuck = await make_worker(status_hang=True)
    other = await make_worker(model_names=["other"])
    pending = asyncio.create_task(
        post_ok(http, controller, "/register_worker", register_body(stuck, status=False))
    )
    async with asyncio.timeout(5):
        while stuck.status_calls == 0:
            await asyncio.sleep(0.005)

    await post_ok(http, controller, "/register_worker", register_body(other))
    assert await post_ok(http, controller, "/list_models") == {"models": ["other"]}
    removed = await post_ok(http, controller, "/unregister_worker", {"worker_name": other.url})
    assert removed == {"removed": True}
    assert not pending.done()

    stuck.release.set()
    await pending
    assert await post_ok(http, controller, "/list_models") == {"models": ["m"]}


def test_the_feed_keeps_only_what_a_listener_has_not_taken() -> None:
    """Without listeners the feed keeps no change (it still counts them); with two, it
    keeps what the slower one has not taken, and a listener that leaves lets the rest go.
    Kept changes are objects the garbage collector walks on every full collection."""
    feed = ChangeFeed()
    info = WorkerInfo("http://10.0.0.1:21002", ("m",), 1.0, True)
    for queue in range(1000):
        feed.append(ChangeKind.HEARTBEAT, info, queue, 0.0)
    assert feed.counts[ChangeKind.HEARTBEAT] == 1000
    assert feed.since(0) is None and feed.since(999) is None and feed.since(1000) == []
    quick, slow = feed.subscribe(), feed.subscribe()
    for queue in range(5):
        feed.append(ChangeKind.HEARTBEAT, info, queue, 0.0)
    taken = quick.take()
    assert taken is not None and [c.version for c in taken] == [1001, 1002, 1003, 1004, 1005]
    feed.append(ChangeKind.REMOVED, info, 0, 0.0, "expired")
    kept = feed.since(1000)
    assert kept is not None and len(kept) == 6  # the slow listener has taken none
    later = slow.take()
    assert later is not None and [c.version for c in later] == list(range(1001, 1007))
    assert feed.since(1005) is not None and feed.since(1004) is None  # quick lags by one
    quick.close()
    assert feed.since(1005) is None and feed.since(1006) == []
