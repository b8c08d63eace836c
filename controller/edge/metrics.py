"""``GET /metrics``: what the controller sees, in Prometheus's text format.

Each controller has its own ``CollectorRegistry`` (several controllers in one process, as
in the tests, never share a series), exposed with prometheus-client's own encoders. The
hot paths never touch a Prometheus object: they add to plain integers (the responses by
route and status here, the dispatches by model in the router, the messages and failovers
in the relay's tally, the changes in the registry's feed), and the
:class:`_Snapshot` collector reads those, and the registry itself, when scraped. So the
per-worker gauges exist exactly while the worker is registered, and a worker's series go
away when it leaves. Only the histograms (one observation per stream, and per loop-lag
sample) are prometheus-client objects. docs/metrics.md lists every series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..decisions.changes import ChangeKind
from ..decisions.registry import Registry
from ..decisions.routing import UNKNOWN_MODEL, Router
from ..relay.tally import RelayTally
from ..upkeep.lag import LAG_INTERVAL

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

Encoder = Callable[[CollectorRegistry], bytes]


class Metrics:
    """One controller's metrics: its registry of collectors, the histograms the relay and
    the loop-lag sampler observe, and the count of responses by route and status."""

    def __init__(self, registry: Registry, router: Router, tally: RelayTally) -> None:
        self.registry = registry
        self.router = router
        self.tally = tally
        #: seconds between two samples of the event loop's lag
        self.lag_interval = LAG_INTERVAL
        #: responses by (endpoint, status): routes and status codes are few, so it stays small
        self.responses: dict[tuple[str, int], int] = {}
        self._static_paths: frozenset[str] | None = None
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
        self.loop_lag = Histogram(
            "fc_controller_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer: a stall of S seconds shows as "
            "a sample of up to S",
            buckets=LAG_BUCKETS,
            registry=reg,
        )
        reg.register(_Snapshot(self))
        # What every Prometheus client library exports about its process (read from /proc
        # when scraped, which never waits on a disk or the network).
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)

    async def count_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count a response as it starts (``on_response_prepare``; a stream at its start)."""
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else self._unrouted(request)
        key = (endpoint, response.status)
        responses = self.responses
        responses[key] = responses.get(key, 0) + 1

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
        body = encoder(self.collectors)
        return web.Response(body=body, headers={"Content-Type": content_type})


def _encoder(accept: str) -> tuple[Encoder, str]:
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        # prometheus-client compares the version a client names with a tuple of ints and
        # fails on one such as "x": such a client gets the classic format.
        log.debug("unusable Accept header on /metrics: %.100r", accept)
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4


class _Snapshot(Collector):
    """The series read from the controller's own numbers when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        registry, tally = metrics.registry, metrics.tally
        requests = CounterMetricFamily(
            "fc_controller_requests",
            "HTTP responses by route (other: a path that is no route) and status code",
            labels=("endpoint", "code"),
        )
        for (endpoint, status), count in sorted(metrics.responses.items()):
            requests.add_metric((endpoint, str(status)), count)
        yield requests
        yield self._dispatches()
        yield from self._workers()
        yield CounterMetricFamily(
            "fc_controller_stream_chunks",
            "NUL-terminated messages relayed from workers to clients",
            value=tally.chunks,
        )
        yield CounterMetricFamily(
            "fc_controller_failovers",
            "Relays tried again on another worker after one failed before its first byte",
            value=tally.failovers,
        )
        feed = registry.feed
        yield CounterMetricFamily(
            "fc_controller_worker_expired",
            "Workers removed because their heartbeats stopped",
            value=feed.removals["expired"],
        )
        removals = CounterMetricFamily(
            "fc_controller_worker_removals",
            "Workers removed, by why: unregistered, expired or unreachable (a failed refresh)",
            labels=("reason",),
        )
        for reason, count in sorted(feed.removals.items()):
            removals.add_metric((reason,), count)
        yield removals
        changes = CounterMetricFamily(
            "fc_controller_registry_changes",
            "Changes to the registry by kind (registered, updated, heartbeat, load, removed)",
            labels=("kind",),
        )
        for kind in ChangeKind:
            changes.add_metric((kind.value,), feed.counts[kind])
        yield changes

    def _dispatches(self) -> Metric:
        router, registry = self._metrics.router, self._metrics.registry
        family = CounterMetricFamily(
            "fc_controller_dispatch",
            "Worker choices by model, relayed streams and calls included (unknown: a model "
            "no registered worker serves)",
            labels=("model",),
        )
        counts = router.dispatched
        # A model no worker serves any more takes its series with it: labels stay bounded.
        for model in [m for m in counts if m != UNKNOWN_MODEL and not registry.serves(m)]:
            del counts[model]
        for model, count in sorted(counts.items()):
            family.add_metric((model,), count)
        return family

    def _workers(self) -> Iterator[Metric]:
        registry = self._metrics.registry
        workers = list(registry)  # the live ones
        now = registry.clock()
        by_model: dict[str, int] = {}
        for worker in workers:
            for model in worker.info.model_names:
                by_model[model] = by_model.get(model, 0) + 1
        family = GaugeMetricFamily(
            "fc_controller_workers", "Live workers serving each model", labels=("model",)
        )
        for model, count in sorted(by_model.items()):
            family.add_metric((model,), count)
        yield family
        inflight = GaugeMetricFamily(
            "fc_controller_inflight",
            "Requests this controller is relaying to each worker right now",
            labels=("worker",),
        )
        queue = GaugeMetricFamily(
            "fc_controller_queue_estimate",
            "Requests dispatch believes each worker holds (its report, plus what was sent "
            "since, minus what ended)",
            labels=("worker",),
        )
        age = GaugeMetricFamily(
            "fc_controller_heartbeat_age_seconds",
            "Seconds since each worker's last sign of life (heartbeat, registration, refresh)",
            labels=("worker",),
        )
        for worker in workers:
            name = (worker.info.name,)
            inflight.add_metric(name, worker.in_flight)
            queue.add_metric(name, worker.load.queue_length)
            age.add_metric(name, max(now - worker.last_heart_beat, 0.0))
        yield inflight
        yield queue
        yield age
