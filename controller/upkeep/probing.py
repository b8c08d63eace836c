"""Asking workers about themselves: registrations that carry no status,
``/refresh_all_workers``, the aggregate status a parent asks for, and load polls.

Each of these awaits a worker's answer between reading the registry and writing it, so
each guards against what may change meanwhile: a refresh or a poll passes the entry's
``generation`` to the registry, which ignores the answer if the worker re-registered or
left in between; a registration and an unregistration of the same name are serialised by
:class:`NameLocks`, so a goodbye sent while the registration's probe is under way is
applied after it, not overtaken by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterable

import aiohttp

from .. import protocol
from ..config import ControllerConfig
from ..decisions.models import Owner, WorkerInfo, WorkerStatus
from ..decisions.ownership import Standing
from ..decisions.registry import Registry
from ..errors import BadRequestError, ForbiddenError, release
from ..jsonbody import read_async
from ..logtext import brief_names
from ..pacing import Allowance, Pacer
from ..protocol import RegisterRequest, worker_url
from ..relay.connections import WorkerConnections, probe_share
from ..relay.guard import RefusedAddress
from ..requestid import HEADER, REQUEST_ID

__all__ = ["NameLocks", "Prober"]

log = logging.getLogger(__name__)

# Workers without a service time yet are polled this many times per load-poll interval.
COLD_POLLS_PER_INTERVAL = 4
# A worker's answer to a status probe larger than this is no answer (bytes).
MAX_STATUS_ANSWER = 1024 * 1024
# How long one round of /worker_get_status probes answers later callers (seconds).
STATUS_REUSE = 1.0
# The longest wait between two load polls of a worker that keeps failing them.
MAX_POLL_BACKOFF = 60.0
# Probes started in one turn of the event loop: each costs about half a millisecond of the
# loop (a connection opened, a request written, an answer read), so a round of a thousand
# goes on a few at a time, between everything else the loop has to do (8 a turn, and 32
# answers, made turns of several milliseconds in the hostile benchmark's status fan-out; 4
# and 8 still a millisecond or two; a round of a thousand takes 500 turns now).
PROBES_PER_TURN = 2
# /worker_get_status callers answered in one turn of the event loop. (Both these, fewer
# after a turn longer than a millisecond: see pacing.Allowance.)
ANSWERS_PER_TURN = 4


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The answer's body, or ``None`` as soon as it is known to be over ``cap`` bytes."""
    if (response.content_length or 0) > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class NameLocks:
    """An ``asyncio.Lock`` per worker name, kept only while someone holds or awaits it.

    It orders the operations on one name that await between deciding and writing
    (registering a worker after probing it) with the others that change the same entry
    (unregistering it, registering it again). Operations on different names never wait
    for each other: a worker whose probe hangs holds up nobody else.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def users(self, name: str) -> int:
        """How many operations on ``name`` hold or await its lock."""
        return self._locks.get(name, (None, 0))[1]


class Prober:
    """Status probes of workers and what the registry makes of their answers."""

    def __init__(
        self, config: ControllerConfig, registry: Registry, connections: WorkerConnections
    ) -> None:
        self.config = config
        self.registry = registry
        self.connections = connections
        self.locks = NameLocks()
        #: the round of probes /refresh_all_workers callers are waiting for, if any
        self._refreshing: asyncio.Future[None] | None = None
        #: the last aggregate status: when its probes started, the registry's membership
        #: count then, and the answer; and the round under way, if any
        self._status: tuple[float, int, WorkerStatus] | None = None
        self._status_round: asyncio.Future[WorkerStatus] | None = None
        self._round_callers: list[asyncio.Future[WorkerStatus]] = []
        #: pace the starts of probes and the answers to a round's callers
        self.pacer = Pacer(PROBES_PER_TURN, Allowance(PROBES_PER_TURN))
        self.answers = Pacer(ANSWERS_PER_TURN, Allowance(ANSWERS_PER_TURN))

    async def probe(self, worker_name: str, *, poll: bool = False) -> WorkerStatus | None:
        """Ask a worker for its status; ``None`` if it fails to answer well in time.

        A load ``poll`` gets a shorter timeout: its answer is useless once stale.
        """
        url = worker_url(worker_name, "/worker_get_status")
        cfg = self.config
        limit = cfg.status_probe_timeout
        if poll:
            limit = min(limit, max(cfg.load_poll_interval, 0.5))
        async with self.connections.probe_slots:  # --max-worker-connections
            return await self._probe(worker_name, url, limit)

    async def probe_all(
        self, worker_names: list[str], *, poll: bool = False
    ) -> list[WorkerStatus | None]:
        """:meth:`probe` each worker; the answers in the same order. As many probes run at
        once as the session has connections (``probe_slots``), carried by that many tasks
        at most, and they start ``PROBES_PER_TURN`` per turn of the loop: a thousand
        workers are never a thousand tasks started in one turn."""
        statuses: list[WorkerStatus | None] = [None] * len(worker_names)
        queue = iter(enumerate(worker_names))

        async def runner() -> None:
            for i, name in queue:
                await self.pacer.turn()
                statuses[i] = await self.probe(name, poll=poll)

        runners = min(len(worker_names), probe_share(self.connections.max_connections))
        await asyncio.gather(*(runner() for _ in range(runners)))
        return statuses

    async def _probe(self, worker_name: str, url: str, limit: float) -> WorkerStatus | None:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=limit)
        try:
            # Never redirected: a worker's answer must not send the controller elsewhere.
            # A probe made for a request (a registration without a status, a refresh)
            # carries that request's id to the worker.
            request_id = REQUEST_ID.get()
            headers = {HEADER: request_id} if request_id is not None else None
            post = self.connections.session.post(
                url, timeout=timeout, allow_redirects=False, headers=headers
            )
            async with post as response:
                if response.status != 200:
                    log.debug("status probe of %s: HTTP %d", worker_name, response.status)
                    return None
                body = await _read_capped(response, MAX_STATUS_ANSWER)
            if body is None:
                log.debug(
                    "status probe of %s: answer over %d bytes", worker_name, MAX_STATUS_ANSWER
                )
                return None
            answer = await read_async(body, protocol.STATUS, cfg.max_models_per_worker)
            return protocol.parse_worker_status(
                answer, "status", allow_zero_speed=True, max_models=cfg.max_models_per_worker
            )
        except (aiohttp.ClientError, TimeoutError, BadRequestError) as e:
            log.debug("status probe of %s failed: %r", worker_name, e)
            release(e)
            return None

    async def check_address(
        self, worker_name: str, also_own: Iterable[tuple[str, int]] = ()
    ) -> None:
        """The worker address policy at registration: :class:`BadRequestError` naming the
        rule when ``worker_name`` resolves to an address the controller may not reach
        (or to its own: ``also_own`` adds addresses known to be this controller's), or
        does not resolve within the status probe timeout."""
        limit = self.config.status_probe_timeout
        try:
            async with asyncio.timeout(limit):
                await self.connections.guard.check_worker(
                    worker_name, also_own, self.config.advertise_address
                )
        except RefusedAddress as e:
            reason = f"refused by the worker address policy: {e}"
            raise BadRequestError("worker_name", reason) from None
        except TimeoutError:
            raise BadRequestError("worker_name", f"did not resolve within {limit:g} s") from None

    async def register(
        self,
        request: RegisterRequest,
        owner: Owner | None = None,
        admin: bool = False,
        source: str | None = None,
    ) -> bool:
        """Register a worker for ``owner``, asking it for its status when the request
        carried none.

        :class:`ForbiddenError` (before any probe) when someone else's principal holds the
        name; a registration that takes a worker over from another host is logged.
        """
        name = request.worker_name
        async with self.locks.hold(name):
            if self.registry.standing(name, owner, admin) is Standing.FORBIDDEN:
                raise ForbiddenError(name)
            # Refused before the probe too: a full registry costs no request to the worker.
            self.registry.check_room(name, source)
            status = request.worker_status
            if status is None:
                status = await self.probe(name)
                if status is None:
                    log.warning("Not registering %s: it did not answer /worker_get_status", name)
                    return False
            info = WorkerInfo.from_status(
                name,
                status,
                check_heart_beat=request.check_heart_beat,
                multimodal=request.multimodal,
            )
            previous = self.registry.get(name)
            if self.registry.standing(name, owner, admin) is Standing.OTHER_SOURCE:
                assert previous is not None
                log.warning(
                    "Worker %s registered again from %s: it now belongs to it, not to %s",
                    name,
                    owner,
                    previous.owner,
                )
            worker, is_new = self.registry.register(
                info, status.queue_length, owner=owner, admin=admin, source=source
            )
        log.info(
            "%s worker %s: models=%s speed=%s queue_length=%d owner=%s",
            "Registered new" if is_new else "Re-registered",
            name,
            brief_names(info.model_names),
            info.speed,
            worker.load.queue_length,
            owner,
        )
        return True

    async def unregister(
        self, worker_name: str, owner: Owner | None = None, admin: bool = False
    ) -> bool:
        """Forget a worker that says it is leaving; ``False`` if it was not registered,
        :class:`ForbiddenError` if someone else registered it."""
        async with self.locks.hold(worker_name):
            removed = self.registry.remove(worker_name, owner=owner, admin=admin) is not None
        if removed:
            log.info("Removed worker %s: it said it is leaving", worker_name)
        return removed

    async def refresh_all_workers(self) -> None:
        """Re-ask every worker for its status at once; drop those that fail to answer.

        Workers stay routable while they are probed. Concurrent calls share one round of
        probes instead of each starting its own.
        """
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            await self._refresh()
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    async def _refresh(self) -> None:
        entries = [(w, w.generation) for w in self.registry]
        statuses = await self.probe_all([w.info.name for w, _ in entries])
        for (worker, generation), status in zip(entries, statuses, strict=True):
            if status is not None:
                self.registry.update(worker, generation, status)
            elif self.registry.remove_if_current(worker, generation):
                log.info(
                    "Removed worker %s: it did not answer /worker_get_status", worker.info.name
                )

    async def aggregate_status(self) -> WorkerStatus:
        """The sum of what every registered worker says now, as if this were one worker.

        One round of probes serves every caller that asks while it runs, and its answer is
        reused for ``STATUS_REUSE`` seconds unless a worker joined, left or changed what it
        serves meanwhile: a thousand parents or clients asking at once cost one probe per
        worker, not a thousand.
        """
        registry = self.registry
        cached = self._status
        if (
            cached is not None
            and registry.clock() - cached[0] < STATUS_REUSE
            and cached[1] == registry.membership
        ):
            return cached[2]
        if self._status_round is None:
            # A task, not a coroutine awaited by its first caller: a caller that gives up
            # (its client left) must not cancel the round the others wait for. Its callers
            # resume a slice a turn, not a thousand in one turn.
            self._status_round = asyncio.ensure_future(self._aggregate())
            callers: list[asyncio.Future[WorkerStatus]] = []
            self._round_callers = callers
            self._status_round.add_done_callback(functools.partial(self.answers.settle, callers))
        caller = asyncio.get_running_loop().create_future()
        self._round_callers.append(caller)
        status: WorkerStatus = await caller
        return status

    async def _aggregate(self) -> WorkerStatus:
        registry = self.registry
        try:
            started, membership = registry.clock(), registry.membership
            workers = list(registry)
            statuses = await self.probe_all([w.info.name for w in workers])
            names: set[str] = set()
            speed: float = 0
            queue = 0
            for status in statuses:
                if status is not None:
                    names.update(status.model_names)
                    speed += status.speed
                    queue += status.queue_length
            result = WorkerStatus(tuple(sorted(names)), speed, queue)
            self._status = (started, membership, result)
            return result
        finally:
            self._status_round = None

    async def poll_load(self) -> int:
        """Ask the workers that got work since their last report for their queue now.

        Stock FastChat workers report only every 45 s; a poll a second keeps the
        controller's view of their load, and so its dispatch, close to the truth. A worker
        whose service time is not known yet is asked four times as often: until then every
        request it gets is a guess, and the first reports after its first requests tell
        how long they take. Only busy workers are asked, all at once; one that fails to
        answer is asked less and less often. An answer updates the worker's load and
        nothing else (see ``Registry.report_load``). Returns how many answered.
        """
        interval = self.config.load_poll_interval
        tick = interval / COLD_POLLS_PER_INTERVAL
        registry = self.registry
        now = registry.clock()
        due = [
            (w, w.generation)
            for w in registry
            if (w.load.dispatched_since_report or w.load.queue_length)
            and w.next_poll_at <= now
            and now - w.load.reported_at
            >= (interval if w.load.service_time is not None else tick) - tick / 2
        ]
        if not due:
            return 0
        statuses = await self.probe_all([w.info.name for w, _ in due], poll=True)
        answered = 0
        now = registry.clock()
        for (worker, generation), status in zip(due, statuses, strict=True):
            if status is None:
                worker.poll_failures += 1
                backoff = interval * (1 << min(worker.poll_failures, 6))
                worker.next_poll_at = now + min(backoff, MAX_POLL_BACKOFF)
                continue
            worker.poll_failures = 0
            # Only the queue: what it serves and whether it is alive are not a poll's to say.
            if registry.report_load(worker, generation, status.queue_length):
                answered += 1
        return answered

    async def poll_load_forever(self) -> None:
        interval = self.config.load_poll_interval / COLD_POLLS_PER_INTERVAL
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_load()
            elapsed = loop.time() - started
            await asyncio.sleep(max(interval - elapsed, interval / 10))
