"""Forgetting workers whose heartbeats stopped, and closing idle worker connections.

A fleet may go silent together (a network partition, a cluster restarting): the sweep then
removes its workers in slices and lets the loop run between two slices, so requests and
heartbeats are served while it works, and it logs the first few removals one by one and the
rest in one line. Routing ignores an expired worker the moment it expires, whether its slice
has come yet or not; the sweep only forgets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

from ..decisions.registry import Registry, Worker
from ..relay.connections import WorkerConnections

__all__ = ["LOGGED_REMOVALS", "SWEEP_SLICE", "expire_now", "slices", "sweep", "sweep_forever"]

log = logging.getLogger(__name__)

#: index entries (one per worker and one per model it serves) a slice of the sweep removes
#: at most: 0.3-0.7 ms of work (512 took 1-2 ms in the hostile benchmark's mass expiry,
#: a wait for every request arriving meanwhile), so 20,000 workers of one model each take
#: 160 slices
SWEEP_SLICE = 256
#: removals per sweep logged one line each; the others are counted in one summary line
LOGGED_REMOVALS = 10

Pause = Callable[[], Awaitable[None]]


async def _next_turn() -> None:
    # One turn of the loop: callbacks that became ready and ready sockets run first.
    await asyncio.sleep(0)


def _cost(worker: Worker) -> int:
    return 1 + len(worker.info.model_names)


def slices(workers: Sequence[Worker], budget: int = SWEEP_SLICE) -> Iterator[Sequence[Worker]]:
    """``workers`` in consecutive slices of at most ``budget`` index entries each (a
    worker serving more models than that makes a slice of its own)."""
    start = 0
    while start < len(workers):
        end = start
        spent = 0
        while end < len(workers) and (end == start or spent + _cost(workers[end]) <= budget):
            spent += _cost(workers[end])
            end += 1
        yield workers[start:end]
        start = end


class _Removals:
    """What one sweep removed, logged as it goes: the first few one by one, then a count."""

    def __init__(self, expiration: float) -> None:
        self.expiration = expiration
        self.workers: list[Worker] = []
        self._longest = 0.0

    def add(self, removed: list[tuple[Worker, float]]) -> None:
        for worker, silent in removed:
            if len(self.workers) < LOGGED_REMOVALS:
                log.info(
                    "Removed worker %s: no heartbeat for %.1f s (expiration %g s)",
                    # Checked printable and short when it registered.
                    worker.info.name,
                    silent,
                    self.expiration,
                )
            else:
                self._longest = max(self._longest, silent)
            self.workers.append(worker)

    def summarise(self) -> None:
        more = len(self.workers) - LOGGED_REMOVALS
        if more > 0:
            log.info(
                "Removed %d more worker(s) in the same sweep: no heartbeat for up to %.1f s "
                "(expiration %g s); %d removed in all",
                more,
                self._longest,
                self.expiration,
                len(self.workers),
            )


def expire_now(registry: Registry) -> list[Worker]:
    """Remove every expired worker now, in one go, and log it; returns them."""
    removals = _Removals(registry.expiration)
    removals.add(registry.expire())
    removals.summarise()
    return removals.workers


async def sweep(
    registry: Registry, *, budget: int = SWEEP_SLICE, pause: Pause = _next_turn
) -> list[Worker]:
    """Remove the workers expired now, a slice of at most ``budget`` index entries at a
    time, awaiting ``pause`` (one turn of the loop) between two slices; returns them.

    Each slice checks its workers again: one that registered again or sent a heartbeat
    meanwhile stays, one removed meanwhile (its late heartbeat drops it) is not removed
    twice. A worker expiring while the sweep runs is left to the next one.
    """
    removals = _Removals(registry.expiration)
    for i, part in enumerate(slices(registry.due(), budget)):
        if i:
            await pause()
        removals.add(registry.expire(part))
    removals.summarise()
    return removals.workers


async def sweep_forever(
    registry: Registry, connections: WorkerConnections, interval: float
) -> None:
    """Every ``interval`` seconds, expire silent workers and prune idle connections."""
    while True:
        await asyncio.sleep(interval)
        await sweep(registry)
        if connections.is_open:
            connections.pool.prune()
