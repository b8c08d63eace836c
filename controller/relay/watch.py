"""Noticing clients that left while their worker is silent, and ending relays on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

__all__ = ["DisconnectWatch", "client_gone"]


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class DisconnectWatch:
    """Notices clients that vanished while their worker is silent, and ends relays on shutdown.

    A client that disconnects is noticed on the next write, but a worker that is thinking,
    queueing the request or hung writes nothing, and aiohttp does not cancel handlers by
    default. One task checks every relay's client connection a few times a second and
    stops the relays whose client is gone by dropping their connection to the worker, which
    ends the relay at once whether or not the worker has started to answer.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        # Keyed by id(): requests are mutable mappings, so not hashable.
        self._relays: dict[int, tuple[web.BaseRequest, Callable[[], object]]] = {}

    def add(self, request: web.BaseRequest, stop: Callable[[], object]) -> None:
        """Watch ``request``'s client; ``stop`` ends its relay (replacing any earlier one)."""
        self._relays[id(request)] = (request, stop)

    def discard(self, request: web.BaseRequest) -> None:
        self._relays.pop(id(request), None)

    def sweep(self) -> int:
        """Stop every relay whose client is gone; returns how many."""
        stopped = 0
        for key, (request, stop) in list(self._relays.items()):
            if client_gone(request):
                del self._relays[key]
                stop()
                stopped += 1
        return stopped

    def close_all(self) -> int:
        """Stop every relay; streams end with the in-band error message."""
        relays, self._relays = self._relays, {}
        for _, stop in relays.values():
            stop()
        return len(relays)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._relays:
                self.sweep()
