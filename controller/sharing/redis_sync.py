"""Reading and writing the shared registry in Redis: one worker's change, a replica's whole
copy (the write-back after an outage), and Redis's whole copy (the resynchronisation).

Every write goes through :data:`~controller.sharing.redis_wire.PUT_SCRIPT`, one call per
``BATCH`` changes: the replica's own changes unversioned (Redis stamps them with its time), the
write-back with the versions the replica holds, which Redis refuses when it holds a newer
change of that worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ..decisions.changes import Change, ChangeKind
from ..decisions.models import WorkerInfo
from ..decisions.registry import Registry
from .redis_apply import Mirror
from .redis_wire import (
    PUT_SCRIPT,
    STREAM,
    STREAM_LENGTH,
    WORKER_PREFIX,
    Entry,
    decode_hash,
    encode_data,
    worker_key,
)

__all__ = ["BATCH", "Write", "Writer", "change_write", "coalesce", "local_writes", "read_all"]

#: changes written (or hashes read) per round trip at most
BATCH = 1000
#: a removal's tombstone lives at least this long (s), longer with a long expiration
MIN_TOMBSTONE = 300.0


class Write(NamedTuple):
    """One change for the put script."""

    name: str
    kind: ChangeKind
    data: str
    #: 0: stamped by Redis now
    version: int
    #: seconds since the worker's last heartbeat
    age: float
    check_heart_beat: bool


class Writer:
    """Writes changes through one client, as one replica."""

    def __init__(self, client: Any, replica: str, expiration: float) -> None:
        self.client = client
        self.replica = replica
        self.expiration = expiration
        self.script = client.register_script(PUT_SCRIPT)

    async def write(self, writes: list[Write]) -> list[int]:
        """Write them all, a batch per call; the version each got, or 0 where Redis
        refused it."""
        versions: list[int] = []
        for start in range(0, len(writes), BATCH):
            batch = writes[start : start + BATCH]
            keys = [STREAM, *(worker_key(w.name) for w in batch)]
            args: list[str | int] = [self.replica, STREAM_LENGTH, self._tomb_ms]
            for write in batch:
                args += self._args(write)
            # The script is loaded again if Redis lost it (a restart, say).
            answers = await self.script(keys=keys, args=args)
            versions += [int(a or 0) for a in answers]
        return versions

    @property
    def _tomb_ms(self) -> int:
        return int(max(self.expiration, MIN_TOMBSTONE) * 1000)

    def _args(self, write: Write) -> tuple[str, str, str, int, int, int]:
        expiration = self.expiration
        ttl_ms = int((expiration - write.age) * 1000) if write.check_heart_beat else 0
        if write.check_heart_beat and write.kind is not ChangeKind.REMOVED:
            # Gone already, wherever its heartbeats went: stored, it would expire at once.
            ttl_ms = max(ttl_ms, 1)
        age_us = int(write.age * 1e6)
        return (write.name, write.kind.value, write.data, write.version, age_us, ttl_ms)


def coalesce(changes: list[Change]) -> dict[str, tuple[Change, ChangeKind]]:
    """The last change per worker, as a registration if one came since its last removal
    (a heartbeat after a registration must still re-create a removed worker)."""
    latest: dict[str, tuple[Change, ChangeKind]] = {}
    for change in changes:
        kind = change.kind
        previous = latest.get(change.info.name)
        if (
            previous is not None
            and kind in (ChangeKind.HEARTBEAT, ChangeKind.LOAD)
            and previous[1] in (ChangeKind.REGISTERED, ChangeKind.UPDATED)
        ):
            kind = previous[1]
        latest[change.info.name] = (change, kind)
    return latest


def change_write(registry: Registry, change: Change, kind: ChangeKind) -> Write:
    """A change made here, as Redis is to stamp it."""
    worker = registry.get(change.info.name)
    age = 0.0
    if worker is not None and kind is not ChangeKind.REMOVED:
        age = max(registry.clock() - worker.last_heart_beat, 0.0)
    source = worker.source if worker is not None else None
    data = encode_data(change.info, change.queue_length, change.owner, source, change.reason)
    return Write(change.info.name, kind, data, 0, age, change.info.check_heart_beat)


def local_writes(
    registry: Registry,
    mirror: Mirror,
    stored: dict[str, Entry],
    estimate: Callable[[], int],
    names: Iterable[str] | None = None,
) -> list[Write]:
    """What this replica holds and Redis (as ``stored``) lacks, with the versions it holds:
    its live workers, and its removals Redis has not taken. ``names`` limits it to those.
    A worker this replica holds no version of (registered while Redis was away before it
    ever answered) gets ``estimate()``, Redis's clock as last measured."""
    writes: list[Write] = []
    now = registry.clock()
    versions = mirror.versions
    if names is None:
        workers = list(registry)
        tombs = list(mirror.tombs.items())
    else:
        wanted = set(names)
        workers = [w for w in (registry.get(n) for n in wanted) if w is not None]
        tombs = [(n, v) for n, v in mirror.tombs.items() if n in wanted]
    for worker in workers:
        name = worker.info.name
        held = versions.get(name)
        if held is None:
            held = versions[name] = estimate()
        there = stored.get(name)
        if there is not None and there.version >= held:
            continue
        data = encode_data(worker.info, worker.load.queue_length, worker.owner, worker.source, "")
        age = max(now - worker.last_heart_beat, 0.0)
        if worker.info.check_heart_beat and age >= registry.expiration:
            continue  # silent for the expiration (held while Redis was away): not shared
        writes.append(
            Write(name, ChangeKind.REGISTERED, data, held, age, worker.info.check_heart_beat)
        )
    for name, version in tombs:
        there = stored.get(name)
        if there is not None and there.version >= version:
            del mirror.tombs[name]
            continue
        data = encode_data(WorkerInfo(name, (), 0.0, True), 0, None, None, "unregistered")
        writes.append(Write(name, ChangeKind.REMOVED, data, version, 0.0, True))
    return writes


async def read_all(client: Any) -> dict[str, Entry]:
    """Every worker Redis holds (tombstones included), by name."""
    keys = [k async for k in client.scan_iter(match=WORKER_PREFIX + "*", count=BATCH)]
    found: dict[str, Entry] = {}
    for start in range(0, len(keys), BATCH):
        async with client.pipeline(transaction=False) as pipe:
            pipe.time()
            for key in keys[start : start + BATCH]:
                pipe.hgetall(key)
            answers = await pipe.execute()
        seconds, micros = answers[0]
        now_us = int(seconds) * 1_000_000 + int(micros)
        for fields in answers[1:]:
            entry = decode_hash(fields, now_us) if fields else None
            if entry is not None:
                found[entry.info.name] = entry
    return found
