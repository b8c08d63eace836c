"""Replicas sharing one registry in Redis (``--registry redis://...``).

Each replica keeps its full registry in memory and dispatches from it alone: Redis is
never asked anything on ``/get_worker_address`` or a stream. :class:`SharedRegistry`
follows the registry's change feed and writes each change made here to Redis (see
:mod:`controller.sharing.redis_wire` for what is stored), follows the stream the other
replicas write to with ``XREAD BLOCK`` and applies their changes here
(:mod:`controller.sharing.redis_apply`), merges the whole registry both ways at connect
and every ``RESYNC_INTERVAL`` to heal anything missed, and shares in-flight counts
(:mod:`controller.sharing.redis_load`).

When Redis is unreachable the replica goes on alone: it serves from its copy, accepts
registrations and heartbeats, and holds expiry on heartbeat age (the heartbeats may be
going to another replica), logging one WARNING and showing
``fc_controller_registry_connected 0``. When Redis answers again it writes back what it
holds (versioned: a write older than what Redis holds, an unregistration included, is
refused), reads everything back, logs one INFO and resumes expiry ``RESUME_GRACE``
seconds later, once the other replicas have written theirs back too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import ControllerConfig, redact_registry
from ..decisions.changes import Change, ChangeKind
from ..decisions.models import WorkerInfo
from ..decisions.registry import Clock, Registry
from ..upkeep.expiry import expire_now
from .redis_apply import Mirror
from .redis_load import SharedLoad
from .redis_wire import (
    PUT_SCRIPT,
    STREAM,
    STREAM_LENGTH,
    WORKER_PREFIX,
    Entry,
    decode_entry,
    encode_data,
    worker_key,
)

__all__ = ["RESUME_GRACE", "RESYNC_INTERVAL", "SharedRegistry"]

log = logging.getLogger(__name__)

#: at start-up, how long a replica waits for Redis before it serves from an empty copy
FIRST_SYNC_TIMEOUT = 5.0
#: seconds between two full merges of the registry with Redis's copy
RESYNC_INTERVAL = 30.0
#: seconds between two attempts to reach Redis while it does not answer
RETRY_INTERVAL = 0.5
#: after Redis is back, expiry resumes this much later (the others write back meanwhile)
RESUME_GRACE = 2.0
#: how long one XREAD waits for a change (ms); a silent connection is noticed after
#: the socket timeout, a little longer
BLOCK_MS = 1000
SOCKET_TIMEOUT = 5.0
#: changes written per round trip at most
BATCH = 1000
#: a removal's tombstone lives at least this long (s), longer with a long expiration
MIN_TOMBSTONE = 300.0

_FAILURES = (RedisError, OSError)


class SharedRegistry:
    """This replica's link to the registry the replicas share in Redis."""

    def __init__(
        self,
        registry: Registry,
        url: str,
        *,
        password: str | None = None,
        wall_clock: Clock = time.time,
        replica: str | None = None,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self.registry = registry
        self.shown_url = redact_registry(url)
        self.replica = replica or secrets.token_hex(8)
        self.wall_clock = wall_clock
        self.resync_interval = resync_interval
        self.mirror = Mirror(registry)
        self.load = SharedLoad(registry, self.mirror, self.replica)
        #: whether Redis answers now (the metrics' fc_controller_registry_connected)
        self.connected = False
        #: set once this replica has merged with Redis (start-up waits for it, a while)
        self.synced = asyncio.Event()
        self._client: Any = aioredis.from_url(
            url,
            password=password,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT + BLOCK_MS / 1000,
            socket_connect_timeout=SOCKET_TIMEOUT,
        )
        self._put = self._client.register_script(PUT_SCRIPT)
        self._changes = registry.feed.subscribe()
        self._down_logged = False
        self._skew_us = 0
        self._session: asyncio.Task[None] | None = None

    @classmethod
    def configured(
        cls, config: ControllerConfig, registry: Registry, wall_clock: Clock = time.time
    ) -> SharedRegistry | None:
        """The link ``config`` asks for, if its registry is shared (else ``None``)."""
        if not config.shared_registry:
            return None
        return cls(
            registry, config.registry, password=config.registry_password, wall_clock=wall_clock
        )

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow Redis until cancelled, reconnecting whenever it stops answering."""
        publisher = asyncio.create_task(self._publish_forever(), name="fc-controller-publish")
        try:
            while True:
                self._session = asyncio.create_task(self._session_once())
                try:
                    await self._session
                except asyncio.CancelledError:
                    # The session is cancelled when publishing finds Redis gone; only our
                    # own cancellation ends the run.
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                await asyncio.sleep(RETRY_INTERVAL)
        finally:
            publisher.cancel()
            if self._session is not None:
                self._session.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            # Connections are opened again if the run is started again.
            await self._client.aclose()

    async def wait_synced(self) -> None:
        """Return once merged with Redis, or after ``FIRST_SYNC_TIMEOUT`` without."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.wait(), FIRST_SYNC_TIMEOUT)

    async def _session_once(self) -> None:
        try:
            cursor = await self._connect()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._follow(cursor))
                group.create_task(self._resync_forever())
                group.create_task(self.load.share_forever(self._client))
                group.create_task(self._resume_expiry())
        except* _FAILURES as failures:
            self._lost(failures.exceptions[0])

    async def _connect(self) -> str:
        """Reach Redis, merge both ways, and return where to follow the stream from."""
        client = self._client
        await client.ping()
        await self._measure_skew()
        newest = await client.xrevrange(STREAM, count=1)
        cursor = newest[0][0] if newest else "0-0"
        await self._merge()
        self.connected = True
        self.synced.set()
        if self._down_logged:
            log.info(
                "Shared registry %s answers again: changes written back, resynced", self.shown_url
            )
        else:
            log.info("Sharing the registry in %s as replica %s", self.shown_url, self.replica)
        self._down_logged = False
        return str(cursor)

    def _lost(self, error: BaseException) -> None:
        """Redis stopped answering: go on alone (once per outage)."""
        was = self.connected
        self.connected = False
        if not self.registry.expiry_held:
            # Those expired already stay gone (the sweep would have removed them soon).
            expire_now(self.registry)
            self.registry.hold_expiry(True)
        if not self._down_logged:
            log.warning(
                "Shared registry %s unreachable (%s): serving from this replica's copy, "
                "accepting registrations and heartbeats here, no expiry on heartbeat age "
                "until it is back",
                self.shown_url,
                type(error).__name__ if not str(error) else error,
            )
        self._down_logged = True
        session = self._session
        if was and session is not None and session is not asyncio.current_task():
            session.cancel()

    async def _resume_expiry(self) -> None:
        if self.registry.expiry_held:
            await asyncio.sleep(RESUME_GRACE)
            self.registry.hold_expiry(False)

    # -- this replica's changes -> Redis ---------------------------------------------------

    async def _publish_forever(self) -> None:
        subscription = self._changes
        while True:
            await subscription.wait()
            changes = subscription.take()
            if changes is None:
                # Fell behind the feed: the next merge writes everything back.
                self.mirror.forget_echo()
                continue
            mine = self.mirror.own(changes)
            if not mine:
                continue
            if not self.connected:
                self._note_offline(mine)
                continue
            try:
                await self._publish(mine)
            except _FAILURES as e:
                self._note_offline(mine)
                self._lost(e)

    async def _publish(self, changes: list[Change]) -> None:
        latest = _coalesce(changes)
        # A removal is remembered until Redis has it: lost on the way, it is written back.
        for change, kind in latest.values():
            if kind is ChangeKind.REMOVED:
                self.mirror.tombs[change.info.name] = self._estimated_now_us()
        items = list(latest.values())
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            async with self._client.pipeline(transaction=False) as pipe:
                for change, kind in batch:
                    self._put_change(pipe, change, kind, 0)
                versions = await pipe.execute()
            for (change, kind), version in zip(batch, versions, strict=True):
                name = change.info.name
                if kind is ChangeKind.REMOVED:
                    self.mirror.tombs.pop(name, None)
                if version and int(version) > self.mirror.versions.get(name, 0):
                    self.mirror.versions[name] = int(version)

    def _note_offline(self, changes: list[Change]) -> None:
        """Changes made while Redis is away: versioned by the estimate of its clock, so the
        write-back orders them with what the other replicas did meanwhile."""
        for change, kind in _coalesce(changes).values():
            version = self._estimated_now_us()
            name = change.info.name
            if kind is ChangeKind.REMOVED:
                self.mirror.tombs[name] = version
            else:
                self.mirror.tombs.pop(name, None)
            self.mirror.versions[name] = version

    def _put_change(self, pipe: Any, change: Change, kind: ChangeKind, version: int) -> None:
        worker = self.registry.get(change.info.name)
        age = 0.0
        if worker is not None and kind is not ChangeKind.REMOVED:
            age = max(self.registry.clock() - worker.last_heart_beat, 0.0)
        source = worker.source if worker is not None else None
        data = encode_data(change.info, change.queue_length, change.owner, source, change.reason)
        self._put_call(
            pipe, change.info.name, kind, data, version, age, change.info.check_heart_beat
        )

    def _put_call(
        self,
        pipe: Any,
        name: str,
        kind: ChangeKind,
        data: str,
        version: int,
        age: float,
        check: bool,
    ) -> bool:
        expiration = self.registry.expiration
        ttl_ms = int((expiration - age) * 1000) if check else 0
        if check and ttl_ms <= 0 and kind is not ChangeKind.REMOVED:
            return False
        tomb_ms = int(max(expiration, MIN_TOMBSTONE) * 1000)
        args = (name, kind.value, data, version, int(age * 1e6), ttl_ms, self.replica)
        # Queued in the pipeline, which loads the script first if Redis lacks it (after a
        # restart, say).
        pipe.scripts.add(self._put)
        pipe.evalsha(self._put.sha, 2, worker_key(name), STREAM, *args, STREAM_LENGTH, tomb_ms)
        return True

    # -- Redis -> this replica ---------------------------------------------------------------

    async def _follow(self, cursor: str) -> None:
        client = self._client
        while True:
            answer = await client.xread({STREAM: cursor}, count=BATCH, block=BLOCK_MS)
            for _, entries in answer or ():
                for entry_id, fields in entries:
                    cursor = entry_id
                    entry = decode_entry(fields)
                    if entry is not None and entry.replica != self.replica:
                        self.mirror.apply(entry)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            await self._merge()

    async def _merge(self) -> None:
        """Merge this replica's registry and Redis's copy, each way by version."""
        remote = await self._read_all()
        mirror = self.mirror
        for entry in remote.values():
            mirror.apply(entry)
        writes: list[tuple[str, ChangeKind, str, int, float, bool]] = []
        clock_now = self.registry.clock()
        for worker in self.registry:
            name = worker.info.name
            held = mirror.versions.get(name)
            stored = remote.get(name)
            if held is None:
                held = mirror.versions[name] = self._estimated_now_us()
            if stored is not None and stored.version >= held:
                continue
            data = encode_data(
                worker.info, worker.load.queue_length, worker.owner, worker.source, ""
            )
            age = max(clock_now - worker.last_heart_beat, 0.0)
            writes.append(
                (name, ChangeKind.REGISTERED, data, held, age, worker.info.check_heart_beat)
            )
        for name, version in list(mirror.tombs.items()):
            stored = remote.get(name)
            if stored is not None and stored.version >= version:
                del mirror.tombs[name]
                continue
            data = encode_data(_gone(name), 0, None, None, "unregistered")
            writes.append((name, ChangeKind.REMOVED, data, version, 0.0, True))
        for start in range(0, len(writes), BATCH):
            async with self._client.pipeline(transaction=False) as pipe:
                for name, kind, data, version, age, check in writes[start : start + BATCH]:
                    self._put_call(pipe, name, kind, data, version, age, check)
                await pipe.execute()
        for name, kind, *_ in writes:
            if kind is ChangeKind.REMOVED:
                mirror.tombs.pop(name, None)

    async def _read_all(self) -> dict[str, Entry]:
        client = self._client
        keys = [k async for k in client.scan_iter(match=WORKER_PREFIX + "*", count=1000)]
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
                entry = decode_entry(fields, now_us) if fields else None
                if entry is not None:
                    found[entry.info.name] = entry
        return found

    async def _measure_skew(self) -> None:
        seconds, micros = await self._client.time()
        self._skew_us = int(seconds) * 1_000_000 + int(micros) - int(self.wall_clock() * 1e6)

    def _estimated_now_us(self) -> int:
        """Redis's clock now, as this replica last measured it against its own."""
        return int(self.wall_clock() * 1e6) + self._skew_us


def _coalesce(changes: list[Change]) -> dict[str, tuple[Change, ChangeKind]]:
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


def _gone(name: str) -> WorkerInfo:
    """What a tombstone written back says of the worker: only its name counts."""
    return WorkerInfo(name, (), 0.0, True)
