"""The controller's own numbers at one instant, and the metric families they make.

:meth:`Readings.take` copies plain values out of the registry, the router, the relays'
tally and the response counts in one go on the event loop (a few milliseconds for 10,000
workers). The families are built from that copy, so they can be built and encoded in
another thread while the loop goes on changing the originals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..decisions.changes import ChangeKind
from ..decisions.registry import Registry
from ..decisions.routing import UNKNOWN_MODEL, Router
from ..relay.tally import RelayTally

__all__ = ["Frozen", "Live", "Readings"]


class WorkerReading(NamedTuple):
    """One live worker (a tuple: one is made per worker per scrape)."""

    #: its address as registered, the label of its series
    name: str
    models: tuple[str, ...]
    in_flight: int
    queue_estimate: int
    #: seconds since its last sign of life
    heartbeat_age: float


#: the per-worker gauges: name, help, and what each shows of a worker
_PER_WORKER: tuple[tuple[str, str, Callable[[WorkerReading], float]], ...] = (
    (
        "fc_controller_inflight",
        "Requests this controller is relaying to each worker right now",
        lambda w: w.in_flight,
    ),
    (
        "fc_controller_queue_estimate",
        "Requests dispatch believes each worker holds (its report, plus what was sent "
        "since, minus what ended)",
        lambda w: w.queue_estimate,
    ),
    (
        "fc_controller_heartbeat_age_seconds",
        "Seconds since each worker's last sign of life (heartbeat, registration, refresh)",
        lambda w: w.heartbeat_age,
    ),
)


@attrs.frozen
class Readings:
    """What the controller counted and what its registry held, at one instant."""

    #: responses by (endpoint, status)
    responses: tuple[tuple[tuple[str, int], int], ...]
    #: dispatches by model (registered ones, and ``unknown``)
    dispatched: tuple[tuple[str, int], ...]
    workers: tuple[WorkerReading, ...]
    chunks: int
    failovers: int
    #: removals by reason, and changes by kind, since the controller started
    removals: tuple[tuple[str, int], ...]
    changes: tuple[tuple[str, int], ...]
    #: with a shared registry, whether its backend answers (None: the memory registry)
    registry_connected: bool | None = None

    @classmethod
    def take(
        cls,
        registry: Registry,
        router: Router,
        tally: RelayTally,
        responses: dict[tuple[str, int], int],
        registry_connected: bool | None = None,
    ) -> Readings:
        """Read everything now; forgets the dispatch counts of models no worker serves
        any more, so that labels stay bounded by what is registered."""
        counts = router.dispatched
        for model in [m for m in counts if m != UNKNOWN_MODEL and not registry.serves(m)]:
            del counts[model]
        now = registry.clock()
        workers = tuple(
            WorkerReading(
                w.info.name,
                w.info.model_names,
                w.in_flight,
                w.load.queue_length,
                max(now - w.last_heart_beat, 0.0),
            )
            for w in registry  # the live ones
        )
        feed = registry.feed
        return cls(
            responses=tuple(responses.items()),
            dispatched=tuple(counts.items()),
            workers=workers,
            chunks=tally.chunks,
            failovers=tally.failovers,
            removals=tuple(feed.removals.items()),
            changes=tuple((kind.value, feed.counts[kind]) for kind in ChangeKind),
            registry_connected=registry_connected,
        )

    def families(self) -> Iterator[Metric]:
        """The series these readings make (docs/metrics.md describes each)."""
        yield _counter(
            "fc_controller_requests",
            "HTTP responses by route (other: a path that is no route) and status code",
            ("endpoint", "code"),
            (((e, str(s)), n) for (e, s), n in self.responses),
        )
        yield _counter(
            "fc_controller_dispatch",
            "Worker choices by model, relayed streams and calls included (unknown: a model "
            "no registered worker serves)",
            ("model",),
            (((m,), n) for m, n in self.dispatched),
        )
        by_model: dict[str, int] = {}
        for worker in self.workers:
            for model in worker.models:
                by_model[model] = by_model.get(model, 0) + 1
        yield _gauge(
            "fc_controller_workers",
            "Live workers serving each model",
            "model",
            by_model.items(),
        )
        for name, documentation, shown in _PER_WORKER:
            values = ((w.name, shown(w)) for w in self.workers)
            yield _gauge(name, documentation, "worker", values)
        yield CounterMetricFamily(
            "fc_controller_stream_chunks",
            "NUL-terminated messages relayed from workers to clients",
            value=self.chunks,
        )
        yield CounterMetricFamily(
            "fc_controller_failovers",
            "Relays tried again on another worker after one failed before its first byte",
            value=self.failovers,
        )
        yield CounterMetricFamily(
            "fc_controller_worker_expired",
            "Workers removed because their heartbeats stopped",
            value=dict(self.removals).get("expired", 0),
        )
        yield _counter(
            "fc_controller_worker_removals",
            "Workers removed, by why: unregistered, expired or unreachable (a failed refresh)",
            ("reason",),
            (((r,), n) for r, n in self.removals),
        )
        yield _counter(
            "fc_controller_registry_changes",
            "Changes to the registry by kind (registered, updated, heartbeat, load, removed)",
            ("kind",),
            (((k,), n) for k, n in self.changes),
        )
        if self.registry_connected is not None:
            yield GaugeMetricFamily(
                "fc_controller_registry_connected",
                "1 while the shared registry (Redis) answers, 0 while this replica serves "
                "from its own copy alone",
                value=int(self.registry_connected),
            )


def _counter(
    name: str,
    documentation: str,
    labels: tuple[str, ...],
    values: Iterable[tuple[tuple[str, ...], float]],
) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in sorted(values):
        family.add_metric(label_values, value)
    return family


def _gauge(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=(label,))
    for label_value, value in values:
        family.add_metric((label_value,), value)
    return family


class Live(Collector):
    """The controller's own series, read afresh at each collection (on the loop)."""

    def __init__(self, take: Callable[[], Readings]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        return self._take().families()


class Frozen(Collector):
    """One scrape: readings already taken, then the ``others`` (histograms, process)."""

    def __init__(self, readings: Readings, others: Iterable[Collector]) -> None:
        self._readings = readings
        self._others = tuple(others)

    def collect(self) -> Iterator[Metric]:
        yield from self._readings.families()
        for collector in self._others:
            yield from collector.collect()
