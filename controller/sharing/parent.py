"""Hierarchical mode: this controller registered with a parent controller as one worker.

The link uses the worker-side heartbeat client, so a child controller behaves towards its
parent exactly like a well-behaved worker: it registers with the sorted union of its live
workers' models, their summed speed and summed queue length; heartbeats with the summed
queue length; registers again when the parent forgets it; and says goodbye on shutdown.

Given several parent addresses (replicas of one logical parent), it talks to one at a time
and moves on to the next when that one cannot be reached, as the heartbeat client does;
each new offer and the goodbye go to the parent in use.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp

from ..decisions.changes import MEMBERSHIP
from ..decisions.registry import Registry
from ..logtext import brief_names
from ..protocol import MAX_SPEED, worker_url
from ..upkeep.supervision import supervise
from ..worker import HeartbeatClient, HeartbeatConfig
from ..worker.config import controller_addresses
from ..worker.tokens import authorization, redact_urls

__all__ = ["ParentLink"]

log = logging.getLogger(__name__)

#: what a child offers when its workers' speeds sum to 0
MIN_OFFERED_SPEED = 0.001
#: seconds the link waits after a change before reading what to offer, so a burst (a
#: fleet registering, or expiring in slices) makes one new offer rather than one per change
OFFER_DEBOUNCE = 0.2


async def _settle() -> None:
    """Let a burst of changes settle before the offer is read again."""
    await asyncio.sleep(OFFER_DEBOUNCE)


class ParentLink:
    """Keeps a controller registered with its parent while it serves at least one model.

    What the child offers changes as its workers come and go; each change of the model set
    or the total speed makes a fresh registration, replacing the old one at the parent.
    A child with no live worker withdraws until it has one again.

    ``parent_address`` is one URL or several separated by commas.

    The link has a session of its own: the one to workers carries the upstream token,
    which is not the parent's business. It sends ``token`` (if any) to the parent and
    verifies an https parent with ``ssl_context`` (the system's trust store if ``None``).
    """

    def __init__(
        self,
        registry: Registry,
        parent_address: str,
        advertise_address: str,
        *,
        interval: float,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        goodbye_timeout: float = 2.0,
    ) -> None:
        self.registry = registry
        self.token = token
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        #: the parents to register with; ``ValueError`` names a bad one
        self.parent_addresses = controller_addresses(parent_address, "parent_controller")
        #: the parent in use: the next client starts there, and the goodbye goes there
        self.parent_address = self.parent_addresses[0]
        self.advertise_address = advertise_address.rstrip("/")
        self.interval = interval
        self.goodbye_timeout = goodbye_timeout
        self.client: HeartbeatClient | None = None
        self._offer: tuple[tuple[str, ...], float] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        """The parent in use as logs show it: credentials in its URL redacted."""
        return redact_urls(self.parent_address)

    def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context or True)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self._task = asyncio.create_task(
            supervise(self._run, "parent-link"), name="fc-controller-parent-link"
        )

    def queue_length(self) -> int:
        return sum(w.load.queue_length for w in self.registry)

    def offer(self) -> tuple[tuple[str, ...], float]:
        """The models this controller serves now and their workers' summed speed."""
        workers = list(self.registry)
        names = tuple(sorted({m for w in workers for m in w.info.model_names}))
        # A parent (ours) takes a speed in (0, MAX_SPEED]: workers whose probes answered
        # 0 would sum to 0, and a large fleet may pass the bound. Clamped, the parent
        # still sees the child, the least or the most capable it can be.
        speed = sum(w.info.speed for w in workers)
        return names, min(max(speed, MIN_OFFERED_SPEED), MAX_SPEED)

    async def _run(self) -> None:
        changes = self.registry.feed.subscribe(MEMBERSHIP)
        # A run that failed may have left the offer half made: the first _follow of a new
        # run makes it again whatever it was.
        self._offer = None
        try:
            while True:
                await self._follow()
                await changes.wait()
                await _settle()
                # The offer is read from the registry itself, whatever the changes were.
                changes.take()
        finally:
            changes.close()

    async def _follow(self) -> None:
        """Make the parent's view match what this controller offers now."""
        offer = self.offer()
        if offer == self._offer:
            return
        was_offering = self.client is not None
        self._offer = offer
        names, speed = offer
        await self._stop_client()
        if not names:
            if was_offering:
                log.info("No live worker left: withdrawing from parent %s", self.where)
                await self._goodbye()
            return
        log.info(
            "Offering models %s to parent controller %s as %s",
            brief_names(names),
            self.where,
            self.advertise_address,
        )
        # The new client starts at the parent in use and moves on from there.
        at = self.parent_addresses.index(self.parent_address)
        config = HeartbeatConfig(
            controller_address=self.parent_addresses[at:] + self.parent_addresses[:at],
            worker_address=self.advertise_address,
            model_names=names,
            speed=speed,
            interval=self.interval,
            # The link says goodbye itself, once, when the controller stops: swapping
            # clients on a change must not withdraw from the parent in between.
            unregister_on_close=False,
            token=self.token,
        )
        self.client = HeartbeatClient(config, self.queue_length, session=self._session)
        await self.client.start()

    async def _stop_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()
            self.parent_address = client.controller_in_use

    async def _goodbye(self) -> None:
        url = worker_url(self.parent_address, "/unregister_worker")
        body = {"worker_name": self.advertise_address}
        timeout = aiohttp.ClientTimeout(total=self.goodbye_timeout)
        try:
            assert self._session is not None, "start() opens the session"
            async with self._session.post(
                url, json=body, timeout=timeout, headers=authorization(self.token)
            ) as r:
                if r.status == 200:
                    log.info("Withdrew from parent controller %s", self.where)
                else:
                    log.info(
                        "Parent controller %s answered HTTP %d to our goodbye; "
                        "it will expire us instead",
                        self.where,
                        r.status,
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info("Could not say goodbye to parent %s: %s", self.where, redact_urls(repr(e)))

    async def aclose(self) -> None:
        """Stop heartbeating and withdraw from the parent. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        had_offer = self.client is not None
        try:
            await self._stop_client()
            if had_offer:
                await self._goodbye()
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()
