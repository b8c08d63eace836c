"""Forgetting workers whose heartbeats stopped, and closing idle worker connections."""

from __future__ import annotations

import asyncio
import logging

from ..decisions.registry import Registry, Worker
from ..relay.connections import WorkerConnections

__all__ = ["expire_now", "sweep_forever"]

log = logging.getLogger(__name__)


def expire_now(registry: Registry) -> list[Worker]:
    """Remove expired workers now and log each; returns them."""
    removed = registry.expire()
    for worker, silent in removed:
        log.info(
            "Removed worker %s: no heartbeat for %.1f s (expiration %g s)",
            worker.info.name,
            silent,
            registry.expiration,
        )
    return [worker for worker, _ in removed]


async def sweep_forever(
    registry: Registry, connections: WorkerConnections, interval: float
) -> None:
    """Every ``interval`` seconds, expire silent workers and prune idle connections.

    Routing ignores an expired worker the moment it expires; the sweep only forgets it
    and logs the removal.
    """
    while True:
        await asyncio.sleep(interval)
        expire_now(registry)
        if connections.is_open:
            connections.pool.prune()
