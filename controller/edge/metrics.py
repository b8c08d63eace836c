"""``GET /metrics``: what the controller sees, in Prometheus's text format.

Each controller has its own ``CollectorRegistry`` (several controllers in one process, as
in the tests, never share a series), exposed with prometheus-client's own encoders. The
hot paths never touch a Prometheus object: they add to plain integers (the responses by
route and status here, the dispatches by model in the router, the messages and failovers
in the relay's tally, the changes in the registry's feed), and a scrape reads those, and
the registry itself, into :class:`~controller.edge.readings.Readings`. So the per-worker
gauges exist exactly while the worker is registered, and a worker's series go away when
it leaves. Only the histograms (one observation per stream, and per loop-lag sample) are
prometheus-client objects.

A scrape takes its readings on the event loop and leaves building and encoding the
families to a thread: for 10,000 workers that is 30,000 samples and over 100 ms of
formatting, which would otherwise hold every request up. docs/metrics.md lists the series.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..decisions.registry import Registry
from ..decisions.routing import Router
from ..relay.tally import RelayTally
from ..sharing.redis_link import SharedRegistry
from ..upkeep.lag import LAG_INTERVAL
from .readings import Frozen, Live, Readings

__all__ = ["OTHER_ENDPOINT", "Metrics"]

log = logging.getLogger(__name__)

#: the endpoint label of a request to a path that is no route
OTHER_ENDPOINT = "other"
#: time to first message: a model's prefill takes from milliseconds to tens of seconds
TTFC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: a whole generation: from a fraction of a second to many minutes
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: loop lag: a healthy loop stays under a millisecond; 100 ms is a stall users notice
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Encoder = Callable[[Collector], bytes]


class Metrics:
    """One controller's metrics: its registry of collectors, the histograms the relay and
    the loop-lag sampler observe, and the count of responses by route and status."""

    def __init__(
        self,
        registry: Registry,
        router: Router,
        tally: RelayTally,
        shared: SharedRegistry | None = None,
    ) -> None:
        self.registry = registry
        #: the registry shared with other replicas, whose connection a scrape shows
        self.shared = shared
        self.router = router
        self.tally = tally
        #: seconds between two samples of the event loop's lag
        self.lag_interval = LAG_INTERVAL
        #: responses by (endpoint, status): routes and status codes are few, so it stays small
        self.responses: dict[tuple[str, int], int] = {}
        self._static_paths: frozenset[str] | None = None
        #: each route's endpoint label, looked up once (routes are the application's few;
        #: a request no route took gets a stand-in of its own, never kept here)
        self._endpoints: dict[web.AbstractRoute, str] = {}
        self.collectors = reg = CollectorRegistry()
        self.ttfc = Histogram(
            "fc_controller_ttfc_seconds",
            "Seconds from a stream's request coming in to its first relayed message going out",
            buckets=TTFC_BUCKETS,
            registry=reg,
        )
        self.stream_duration = Histogram(
            "fc_controller_stream_duration_seconds",
            "Seconds from a stream's request coming in to its end, for streams that relayed "
            "a worker's message",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        # The relays observe a stream's times into these two.
        tally.ttfc, tally.stream_duration = self.ttfc, self.stream_duration
        self.loop_lag = Histogram(
            "fc_controller_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer: a stall of S seconds shows as "
            "a sample of up to S",
            buckets=LAG_BUCKETS,
            registry=reg,
        )
        reg.register(Live(self.read))
        #: what a scrape collects beside the readings: the histograms, and what every
        #: Prometheus client library exports about its process (read from /proc, which
        #: never waits on a disk or the network, in the scrape's thread)
        self._others: tuple[Collector, ...] = (
            self.ttfc,
            self.stream_duration,
            self.loop_lag,
            ProcessCollector(registry=reg),
            PlatformCollector(registry=reg),
            GCCollector(registry=reg),
        )

    def read(self) -> Readings:
        """The controller's own numbers now (on the loop)."""
        shared = self.shared
        return Readings.take(
            self.registry,
            self.router,
            self.tally,
            self.responses,
            None if shared is None else shared.connected,
        )

    def count(self, request: web.Request, status: int) -> None:
        """Count an answer of ``status`` to ``request`` as it starts (see
        :mod:`~controller.edge.request_ids` for who calls this)."""
        route = request.match_info.route
        endpoint = self._endpoints.get(route)
        if endpoint is None:
            resource = route.resource
            if resource is None:
                endpoint = self._unrouted(request)
            else:
                endpoint = self._endpoints[route] = resource.canonical
        key = (endpoint, status)
        responses = self.responses
        responses[key] = responses.get(key, 0) + 1

    async def count_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count a response as it starts: an ``on_response_prepare`` receiver, for a
        controller attached to a host application (whose answers count too)."""
        self.count(request, response.status)

    def _unrouted(self, request: web.Request) -> str:
        """The endpoint of a request no route took: its path when some route has that path
        with another method (405), else ``other`` (so no client can invent labels)."""
        match = request.match_info
        if isinstance(match, MatchInfoError) and match.http_exception.status == 405:
            paths = self._static_paths
            if paths is None:
                resources = request.app.router.resources()
                paths = self._static_paths = frozenset(
                    r.canonical for r in resources if isinstance(r, web.PlainResource)
                )
            if request.path in paths:
                return request.path
        return OTHER_ENDPOINT

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: the text format Prometheus asks for (OpenMetrics if it says
        so in ``Accept``, else the classic text format)."""
        encoder, content_type = _encoder(request.headers.get("Accept", ""))
        scrape = Frozen(self.read(), self._others)
        body = await asyncio.to_thread(encoder, scrape)
        return web.Response(body=body, headers={"Content-Type": content_type})


def _encoder(accept: str) -> tuple[Encoder, str]:
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        # prometheus-client compares the version a client names with a tuple of ints and
        # fails on one such as "x": such a client gets the classic format.
        log.debug("unusable Accept header on /metrics: %.100r", accept)
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4
