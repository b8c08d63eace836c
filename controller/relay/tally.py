"""What the relays count for the metrics, in plain numbers cheap to bump on the hot path.

A relayed message costs the controller a few microseconds; a Prometheus counter's ``inc``
takes a lock and would add a noticeable share to that. So the relays add to plain integers
here and the metrics read them when scraped. Once per stream (not per message), its time
to first message and its duration go to two :class:`Observer` objects: histograms when the
controller has metrics, nothing otherwise; and its answer is counted as it starts, when the
application does not count it already. Nothing here imports the metrics library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from aiohttp import web

__all__ = ["Count", "Observer", "RelayTally", "StreamTiming", "uncounted"]

#: counts an answer of a status (the second argument) to a request
Count = Callable[[web.Request, int], None]


class Observer(Protocol):
    """Takes one observation (a histogram's ``observe``)."""

    def observe(self, amount: float) -> None: ...


def uncounted(request: web.Request, status: int) -> None:
    """A :data:`Count` that keeps nothing: where something else counts the answers."""


class _Unobserved:
    """An observer that keeps nothing: the default until metrics are wired in."""

    def observe(self, amount: float) -> None:
        pass


@attrs.define(eq=False, slots=True)
class RelayTally:
    """Counts shared by every relay of one controller."""

    #: NUL-terminated messages relayed from workers to clients (in-band errors the
    #: controller writes itself are not relayed messages)
    chunks: int = 0
    #: attempts that failed before their first byte and were tried again on another worker
    failovers: int = 0
    #: seconds from a stream's request coming in to its first relayed message going out
    ttfc: Observer = attrs.field(factory=_Unobserved)
    #: seconds from a stream's request coming in to its end, for streams that relayed one
    stream_duration: Observer = attrs.field(factory=_Unobserved)
    #: counts a stream's answer (its status) as it starts, when nothing else counts it
    #: (a standalone controller: see controller.edge.request_ids)
    started: Count = uncounted


@attrs.define(eq=False, slots=True)
class StreamTiming:
    """When one stream's request came in and its first relayed message went out."""

    clock: Callable[[], float]
    started: float
    first_out: float | None = None

    def first(self) -> None:
        """The first relayed message has just been written to the client."""
        if self.first_out is None:
            self.first_out = self.clock()

    def report(self, tally: RelayTally) -> None:
        """Observe this stream's time to first message and duration, if it relayed one."""
        if self.first_out is not None:
            tally.ttfc.observe(self.first_out - self.started)
            tally.stream_duration.observe(self.clock() - self.started)
