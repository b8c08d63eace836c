"""The local side of a shared registry, without Redis: other replicas' changes applied
through the registry (and never published back), versions that only move forward, held
expiry, and in-flight counts that are added once."""

from __future__ import annotations

from controller.decisions.changes import ChangeKind
from controller.decisions.models import Owner, WorkerInfo
from controller.decisions.registry import Registry
from controller.sharing.redis_apply import Mirror
from controller.sharing.redis_load import SharedLoad
from controller.sharing.redis_wire import Entry, decode_hash, decode_stream, encode_data

from .conftest import FakeClock

NAME = "http://10.0.0.1:31000"
INFO = WorkerInfo(NAME, ("m",), 1.0, True)


def entry(
    kind: ChangeKind, version: int, *, queue: int = 0, age: float = 0.0, info: WorkerInfo = INFO
) -> Entry:
    return Entry(kind, version, info, queue, Owner(principal="gpu-a"), "10.0.0.1", "", age, "b")


def test_another_replica_s_changes_apply_here_and_are_not_published_back(
    clock: FakeClock,
) -> None:
    registry = Registry(10.0, clock)
    mirror = Mirror(registry)
    subscription = registry.feed.subscribe()
    assert mirror.apply(entry(ChangeKind.REGISTERED, 100, queue=2))
    worker = registry.get(NAME)
    assert worker is not None and worker.owner == Owner(principal="gpu-a")
    assert worker.source == "10.0.0.1" and worker.queue_length == 2
    clock.advance(8)
    assert mirror.apply(entry(ChangeKind.HEARTBEAT, 101, queue=1))
    clock.advance(8)  # 16 s after registering, 8 after the heartbeat another replica had
    assert registry.get(NAME) is not None
    # A local heartbeat is this replica's own; the applied ones are not.
    registry.heartbeat(NAME, 3)
    changes = subscription.take()
    assert changes is not None
    mine = mirror.own(changes)
    assert [(c.kind, c.queue_length) for c in mine] == [(ChangeKind.HEARTBEAT, 3)]


def test_an_older_version_changes_nothing(clock: FakeClock) -> None:
    registry = Registry(10.0, clock)
    mirror = Mirror(registry)
    mirror.apply(entry(ChangeKind.REGISTERED, 100))
    assert not mirror.apply(entry(ChangeKind.REMOVED, 99))
    assert registry.get(NAME) is not None
    assert mirror.apply(entry(ChangeKind.REMOVED, 102))
    assert registry.get(NAME) is None
    # A stale copy (a replica's write-back of what it held before the removal) is refused.
    assert not mirror.apply(entry(ChangeKind.REGISTERED, 101))
    assert registry.get(NAME) is None


def test_a_copy_older_than_the_expiration_is_not_registered(clock: FakeClock) -> None:
    registry = Registry(10.0, clock)
    Mirror(registry).apply(entry(ChangeKind.HEARTBEAT, 100, age=11.0))
    assert registry.get(NAME) is None


def test_expiries_are_not_published(clock: FakeClock) -> None:
    registry = Registry(10.0, clock)
    mirror = Mirror(registry)
    subscription = registry.feed.subscribe()
    registry.register(INFO, 0)
    clock.advance(11)
    registry.expire()
    changes = subscription.take()
    assert changes is not None
    assert [c.kind for c in changes] == [ChangeKind.REGISTERED, ChangeKind.REMOVED]
    assert [c.kind for c in mirror.own(changes)] == [ChangeKind.REGISTERED]


def test_held_expiry_keeps_silent_workers_and_resumes(clock: FakeClock) -> None:
    registry = Registry(10.0, clock)
    registry.register(INFO, 0)
    registry.hold_expiry(True)
    clock.advance(60)
    assert registry.get(NAME) is not None and registry.due() == []
    assert [w.name for w in registry.candidates("m")] == [NAME]
    registry.hold_expiry(False)
    assert registry.get(NAME) is None
    assert [w.name for w, _ in registry.expire()] == [NAME]


def test_other_replicas_counts_are_added_once_and_only_for_the_report_held(
    clock: FakeClock,
) -> None:
    registry = Registry(10.0, clock)
    mirror = Mirror(registry)
    load = SharedLoad(registry, mirror, "a")
    mirror.apply(entry(ChangeKind.REGISTERED, 100, queue=1))
    worker = registry.get(NAME)
    assert worker is not None and worker.queue_length == 1
    # Counts made against the report held here are added; against an older one, not.
    load.take_others([{NAME: "3:100"}, {NAME: "5:90"}])
    assert worker.queue_length == 4
    load.take_others([{NAME: "2:100"}])
    assert worker.queue_length == 3
    # A new report includes every replica's requests: the others' counts go with it.
    mirror.apply(entry(ChangeKind.HEARTBEAT, 110, queue=6))
    assert worker.queue_length == 6
    load.take_others([{NAME: "2:100"}])
    assert worker.queue_length == 6
    load.take_others([])
    assert worker.queue_length == 6


def test_a_replica_publishes_what_it_sent_since_the_last_report(clock: FakeClock) -> None:
    registry = Registry(10.0, clock)
    mirror = Mirror(registry)
    load = SharedLoad(registry, mirror, "a")
    mirror.apply(entry(ChangeKind.REGISTERED, 100, queue=4))
    worker = registry.get(NAME)
    assert worker is not None
    assert load.mine() == {}
    worker.load.dispatched(clock())
    worker.load.dispatched(clock())
    load.take_others([{NAME: "5:100"}])
    assert load.mine() == {NAME: "2:100"}
    for _ in range(3):
        worker.load.stream_ended()
    # 8 believed, 5 of them the others': 3 may be this replica's, of which it sent 2.
    assert load.mine() == {NAME: "2:100"}
    for _ in range(2):
        worker.load.stream_ended()
    # 6 believed, 5 the others': never more than 1 of its own.
    assert load.mine() == {NAME: "1:100"}


def test_the_wire_round_trips_and_skips_garbage() -> None:
    data = encode_data(INFO, 3, Owner(host="10.0.0.9"), None, "")
    packed = {"e": f"heartbeat\t1733\tx\t2500000\t{data}\t{NAME}"}
    decoded = decode_stream(packed, own="me")
    assert decoded is not None
    assert decoded.info == INFO and decoded.owner == Owner(host="10.0.0.9")
    assert decoded.age == 2.5 and decoded.queue_length == 3 and decoded.version == 1733
    assert decode_stream(packed, own="x") is None  # this replica's own change
    assert decode_stream({"e": packed["e"].replace(data, "{")}, own="me") is None
    assert decode_stream({"e": packed["e"].replace("heartbeat", "nonsense")}, own="me") is None
    assert decode_stream({"n": NAME}, own="me") is None
    stored = {"n": NAME, "k": "removed", "v": "9", "d": data, "b": "1000000", "r": "x"}
    removed = decode_hash(stored, now_us=4_000_000)
    assert removed is not None and removed.kind is ChangeKind.REMOVED and removed.age == 3.0
    assert decode_hash({**stored, "b": "soon"}, now_us=4_000_000) is None
