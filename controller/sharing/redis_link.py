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
from ..decisions.registry import Clock, Registry
from ..upkeep.expiry import expire_now
from .redis_apply import Mirror
from .redis_load import SharedLoad
from .redis_sync import BATCH, Writer, change_write, coalesce, local_writes, read_all
from .redis_wire import STREAM, decode_stream

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
#: after a write, changes gather this long (s) before the next one
PUBLISH_GATHER = 0.002
#: how long one XREAD waits for a change (ms); a silent connection is noticed after
#: the socket timeout, a little longer
BLOCK_MS = 1000
SOCKET_TIMEOUT = 5.0

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
        self._writer = Writer(self._client, self.replica, registry.expiration)
        self._changes = registry.feed.subscribe()
        self._down_logged = False
        self._skew_us = 0
        self._session: asyncio.Task[None] | None = None
        # Workers changed here while Redis was away and not written back yet.
        self._dirty: set[str] = set()

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
                session = self._session = asyncio.create_task(self._session_once())
                await asyncio.wait((session, publisher), return_when=asyncio.FIRST_COMPLETED)
                if publisher.done():
                    publisher.result()  # it ends only by raising: the supervisor restarts us
                # A session ends after a failure, or cancelled when publishing found Redis
                # gone; anything else it raised is a bug for the supervisor to log.
                if not session.cancelled() and session.exception() is not None:
                    session.result()
                await asyncio.sleep(RETRY_INTERVAL)
        finally:
            publisher.cancel()
            if self._session is not None:
                self._session.cancel()
            await asyncio.gather(
                publisher, *(t for t in [self._session] if t), return_exceptions=True
            )
            # Connections are opened again if the run is started again.
            await self._client.aclose()

    async def wait_synced(self) -> None:
        """Return once merged with Redis, or after ``FIRST_SYNC_TIMEOUT`` without."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_SYNC_TIMEOUT):  # not wait_for: see state.py
                await self.synced.wait()

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
        seconds, micros = await client.time()
        self._skew_us = int(seconds) * 1_000_000 + int(micros) - int(self.wall_clock() * 1e6)
        newest = await client.xrevrange(STREAM, count=1)
        cursor = newest[0][0] if newest else "0-0"
        self._dirty.clear()  # the merge writes back everything held until it reads
        await self._merge()
        self.connected = True
        # What changed here while the merge was on its way: written now; from here on
        # changes are published as they come.
        late, self._dirty = self._dirty, set()
        if late:
            await self._writer.write(
                local_writes(self.registry, self.mirror, {}, self._estimate, late)
            )
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
                str(error) or type(error).__name__,
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
            # A change alone goes out at once; under a burst the next ones gather for a
            # moment and go together, a round trip and a script call for many.
            await asyncio.sleep(PUBLISH_GATHER)

    async def _publish(self, changes: list[Change]) -> None:
        latest = list(coalesce(changes).values())
        mirror = self.mirror
        # A removal is remembered until Redis has it: lost on the way, it is written back.
        for change, kind in latest:
            if kind is ChangeKind.REMOVED:
                mirror.tombs[change.info.name] = self._estimate()
        registry = self.registry
        versions = await self._writer.write([change_write(registry, c, k) for c, k in latest])
        for (change, kind), version in zip(latest, versions, strict=True):
            name = change.info.name
            if kind is ChangeKind.REMOVED:
                mirror.tombs.pop(name, None)
            if version > mirror.versions.get(name, 0):
                mirror.versions[name] = version

    def _note_offline(self, changes: list[Change]) -> None:
        """Changes made while Redis is away: versioned by the estimate of its clock, so the
        write-back orders them with what the other replicas did meanwhile."""
        mirror = self.mirror
        for name, (_, kind) in coalesce(changes).items():
            version = self._estimate()
            if kind is ChangeKind.REMOVED:
                mirror.tombs[name] = version
            else:
                mirror.tombs.pop(name, None)
            mirror.versions[name] = version
            self._dirty.add(name)

    # -- Redis -> this replica ---------------------------------------------------------------

    async def _follow(self, cursor: str) -> None:
        client = self._client
        while True:
            answer = await client.xread({STREAM: cursor}, count=BATCH, block=BLOCK_MS)
            for _, entries in answer or ():
                for entry_id, fields in entries:
                    cursor = entry_id
                    entry = decode_stream(fields, self.replica)
                    if entry is not None:
                        self.mirror.apply(entry)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            await self._merge()

    async def _merge(self) -> None:
        """Merge this replica's registry and Redis's copy, each way by version."""
        stored = await read_all(self._client)
        mirror = self.mirror
        for count, entry in enumerate(stored.values(), 1):
            mirror.apply(entry)
            if count % BATCH == 0:
                await asyncio.sleep(0)  # a large fleet is applied a batch per turn of the loop
        await self._writer.write(local_writes(self.registry, mirror, stored, self._estimate))
        # Forget the versions of workers nobody holds any more (Redis's tombstone expired).
        held = {w.info.name for w in self.registry}
        for name in [n for n in mirror.versions if n not in held and n not in stored]:
            if name not in mirror.tombs and name not in self._dirty:
                del mirror.versions[name]

    def _estimate(self) -> int:
        """Redis's clock now, as this replica last measured it against its own (µs)."""
        return int(self.wall_clock() * 1e6) + self._skew_us
