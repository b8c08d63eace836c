"""GET /metrics: the series' values after known traffic, read back through
prometheus-client's own parser, their bounded label sets, and who may read them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from controller import Controller, ControllerConfig
from controller.credentials import Access, TokenTable, parse_networks
from controller.decisions.changes import ChangeFeed, ChangeKind
from controller.decisions.models import WorkerInfo
from controller.upkeep.lag import sample_loop_lag

from .conftest import (
    FakeClock,
    FakeWorker,
    MakeWorker,
    RunController,
    post_ok,
    register,
    register_body,
    stream,
    wait_until,
)

CLIENT = "client-token-0123456789abcdef"
WORKER = "worker-token-0123456789abcdef"
#: the series the issue names, each as its exposition spells a sample of it
CONTRACT = [
    "fc_controller_requests_total",
    "fc_controller_dispatch_total",
    "fc_controller_workers",
    "fc_controller_inflight",
    "fc_controller_queue_estimate",
    "fc_controller_stream_chunks_total",
    "fc_controller_ttfc_seconds_count",
    "fc_controller_stream_duration_seconds_count",
    "fc_controller_worker_expired_total",
    "fc_controller_failovers_total",
    "fc_controller_event_loop_lag_seconds_count",
    "fc_controller_heartbeat_age_seconds",
]


@attrs.frozen
class Scrape:
    """One scrape's samples, by sample name and then by their labels."""

    samples: dict[str, dict[frozenset[tuple[str, str]], float]]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for s in family.samples:
                samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return cls(samples, types)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or ``None`` when there is none."""
        return self.samples.get(name, {}).get(frozenset(labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(key)[label] for key in self.samples.get(name, {}) if label in dict(key)}


async def scrape(http: aiohttp.ClientSession, base: str, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{base}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape.parse(await r.text())


def local(**kwargs: Any) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, **kwargs)


async def test_every_series_the_issue_names_is_exposed(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """After one stream, each series the issue names is in the exposition, with its type."""
    controller = await run_controller(local())
    controller.metrics.lag_interval = 0.01
    worker = await make_worker()
    await register(http, controller, worker)
    await stream(http, controller)

    async def sampled() -> bool:
        got = await scrape(http, controller.url)
        return (got.value("fc_controller_event_loop_lag_seconds_count") or 0) >= 1

    await wait_until(sampled)
    got = await scrape(http, controller.url)
    missing = [name for name in CONTRACT if name not in got.samples]
    assert missing == []
    assert got.types["fc_controller_ttfc_seconds"] == "histogram"
    assert got.types["fc_controller_stream_duration_seconds"] == "histogram"
    assert got.types["fc_controller_event_loop_lag_seconds"] == "histogram"
    assert got.types["fc_controller_requests"] == "counter"
    assert got.types["fc_controller_inflight"] == "gauge"


async def test_requests_are_counted_by_route_and_status(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Known traffic shows up by endpoint and code: a path that is no route counts as
    endpoint="other" (whatever the path), a wrong method on a route under that route."""
    controller = await run_controller(local())
    worker = await make_worker()
    await register(http, controller, worker)
    for _ in range(3):
        await post_ok(http, controller, "/get_worker_address", {"model": "m"})
    async with http.post(f"{controller.url}/get_worker_address", data=b"{not json") as r:
        assert r.status == 400
    for path in ("/no/such/route", "/another-one", "/%00weird"):
        async with http.get(f"{controller.url}{path}") as r:
            assert r.status == 404
    async with http.get(f"{controller.url}/get_worker_address") as r:
        assert r.status == 405
    got = await scrape(http, controller.url)
    requests = "fc_controller_requests_total"
    assert got.value(requests, endpoint="/get_worker_address", code="200") == 3
    assert got.value(requests, endpoint="/get_worker_address", code="400") == 1
    assert got.value(requests, endpoint="/get_worker_address", code="405") == 1
    assert got.value(requests, endpoint="/register_worker", code="200") == 1
    assert got.value(requests, endpoint="other", code="404") == 3
    endpoints = got.label_values(requests, "endpoint")
    assert not any("such" in e or "another" in e or "weird" in e for e in endpoints)


async def test_dispatches_are_counted_by_registered_model_or_unknown(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Every worker choice counts under its model, streams included; a model nobody
    serves counts as "unknown" and never becomes a label of its own."""
    controller = await run_controller(local())
    worker = await make_worker(model_names=["m", "m2"])
    await register(http, controller, worker)
    for _ in range(3):
        await post_ok(http, controller, "/get_worker_address", {"model": "m"})
    await stream(http, controller)
    await stream(http, controller, {"model": "m2"})
    for name in ("made-up-1", "made-up-2"):
        assert await post_ok(http, controller, "/get_worker_address", {"model": name}) == {
            "address": ""
        }
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_dispatch_total", model="m") == 4
    assert got.value("fc_controller_dispatch_total", model="m2") == 1
    assert got.value("fc_controller_dispatch_total", model="unknown") == 2
    assert got.label_values("fc_controller_dispatch_total", "model") == {"m", "m2", "unknown"}
    assert got.value("fc_controller_workers", model="m") == 1
    assert got.value("fc_controller_workers", model="m2") == 1


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
async def test_streams_fill_the_histograms_and_count_every_message(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    split: bool,
) -> None:
    """N streams of T messages: both histograms count N, the chunk counter N * T, whether
    the worker sends each message in one piece or two."""
    controller = await run_controller(local())
    worker = await make_worker(tokens=5, split=split)
    await register(http, controller, worker)
    for _ in range(4):
        assert len(await stream(http, controller)) == 5
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_ttfc_seconds_count") == 4
    assert got.value("fc_controller_stream_duration_seconds_count") == 4
    assert got.value("fc_controller_stream_chunks_total") == 20
    assert got.value("fc_controller_failovers_total") == 0


async def test_a_stream_cut_midway_counts_the_messages_relayed_not_the_error(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker that dies after 2 of 5 messages: 2 relayed, the controller's in-band error
    is not a relayed message; the stream still counts in both histograms."""
    controller = await run_controller(local())
    worker = await make_worker(tokens=5, die_after=2)
    await register(http, controller, worker)
    messages = await stream(http, controller)
    assert [m["error_code"] for m in messages] == [0, 0, 50006]
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_stream_chunks_total") == 2
    assert got.value("fc_controller_ttfc_seconds_count") == 1
    assert got.value("fc_controller_stream_duration_seconds_count") == 1


async def test_a_stream_no_worker_serves_is_in_no_histogram(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """The in-band "no worker" answer relays nothing: no chunk, no TTFC observation."""
    controller = await run_controller(local())
    assert [m["error_code"] for m in await stream(http, controller)] == [50005]
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_stream_chunks_total") == 0
    assert got.value("fc_controller_ttfc_seconds_count") == 0
    assert got.value("fc_controller_dispatch_total", model="unknown") == 1


async def test_time_to_first_chunk_counts_from_the_request_to_the_first_message(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    """A worker that holds its answer while 0.3 s pass (on the injected clock) puts the
    stream in the TTFC histogram's 0.5 s bucket, not its 0.25 s one."""
    controller = await run_controller(local(), clock=clock)
    worker = await make_worker(hold_headers=True)
    await register(http, controller, worker)
    streaming = asyncio.create_task(stream(http, controller))
    await worker.stream_started.wait()
    clock.advance(0.3)
    worker.release.set()
    assert len(await streaming) == 3
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_ttfc_seconds_bucket", le="0.25") == 0
    assert got.value("fc_controller_ttfc_seconds_bucket", le="0.5") == 1
    assert got.value("fc_controller_ttfc_seconds_sum") == pytest.approx(0.3)
    assert got.value("fc_controller_stream_duration_seconds_sum") == pytest.approx(0.3)


async def test_in_flight_streams_show_per_worker_and_go_back_to_zero(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Two streams held by a worker show as inflight 2 (and in its queue estimate) under
    its registered address; once they end, both gauges are back to 0."""
    controller = await run_controller(local())
    worker = await make_worker(hang_after=1)
    await register(http, controller, worker)
    streams = [asyncio.create_task(stream(http, controller)) for _ in range(2)]

    async def two_in_flight() -> bool:
        got = await scrape(http, controller.url)
        return got.value("fc_controller_inflight", worker=worker.url) == 2

    await wait_until(two_in_flight)
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_queue_estimate", worker=worker.url) == 2
    worker.release.set()
    for done in await asyncio.gather(*streams):
        assert len(done) == 3
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_inflight", worker=worker.url) == 0
    assert got.value("fc_controller_queue_estimate", worker=worker.url) == 0


@pytest.mark.parametrize("embedded", [False, True], ids=["standalone", "embedded"])
async def test_a_stream_counts_once_as_it_starts(
    make_worker: MakeWorker, http: aiohttp.ClientSession, embedded: bool
) -> None:
    """A stream held open after its first message already counts as a 200 of its route
    (docs/metrics.md: counted when the response starts), and still once after it ends;
    its answer carries the request's id. Standalone, the connection layer counts; in a
    host application, its on_response_prepare receiver does."""
    server: TestServer | None = None
    if embedded:
        app = web.Application()
        controller = await Controller.start(app, local())
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        base = str(server.make_url("")).rstrip("/")
    else:
        controller = await Controller.serve(local())
        base = controller.url
    try:
        worker = await make_worker(hang_after=1)
        async with http.post(f"{base}/register_worker", json=register_body(worker.url)) as r:
            assert r.status == 200
        key = {"endpoint": "/worker_generate_stream", "code": "200"}
        sent = {"X-Request-Id": "stream-counted-1"}
        async with http.post(
            f"{base}/worker_generate_stream", json={"model": "m"}, headers=sent
        ) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "stream-counted-1"
            assert await r.content.readuntil(b"\0")
            got = await scrape(http, base)
            assert got.value("fc_controller_requests_total", **key) == 1
            worker.release.set()
            await r.read()
        got = await scrape(http, base)
        assert got.value("fc_controller_requests_total", **key) == 1
    finally:
        if server is not None:
            await server.close()
        await controller.aclose()


def worker_series(got: Scrape, worker: FakeWorker) -> list[str]:
    names = (
        "fc_controller_inflight",
        "fc_controller_queue_estimate",
        "fc_controller_heartbeat_age_seconds",
    )
    return [n for n in names if worker.url in got.label_values(n, "worker")]


async def test_a_worker_s_series_go_when_it_unregisters(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A worker that says goodbye takes its per-worker series and its model's with it."""
    controller = await run_controller(local())
    leaving, staying = await make_worker(model_names=["gone"]), await make_worker()
    await register(http, controller, leaving, staying)
    await post_ok(http, controller, "/get_worker_address", {"model": "gone"})
    got = await scrape(http, controller.url)
    assert len(worker_series(got, leaving)) == 3
    assert got.value("fc_controller_dispatch_total", model="gone") == 1
    await post_ok(http, controller, "/unregister_worker", {"worker_name": leaving.url})
    got = await scrape(http, controller.url)
    assert worker_series(got, leaving) == []
    assert len(worker_series(got, staying)) == 3
    assert "gone" not in got.label_values("fc_controller_workers", "model")
    assert "gone" not in got.label_values("fc_controller_dispatch_total", "model")
    assert got.value("fc_controller_worker_removals_total", reason="unregistered") == 1
    assert got.value("fc_controller_worker_expired_total") == 0


async def test_an_expired_worker_is_counted_and_its_series_go(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    """Heartbeat age grows with the (injected) clock; past the expiration the worker is
    invisible at once, and once swept it counts in worker_expired_total."""
    controller = await run_controller(local(heart_beat_expiration=30), clock=clock)
    worker = await make_worker()
    await register(http, controller, worker)
    clock.advance(7)
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_heartbeat_age_seconds", worker=worker.url) == 7
    clock.advance(24)
    got = await scrape(http, controller.url)
    assert worker_series(got, worker) == []
    assert got.value("fc_controller_worker_expired_total") == 0
    assert [w.info.name for w in controller.expire_now()] == [worker.url]
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_worker_expired_total") == 1
    assert got.value("fc_controller_worker_removals_total", reason="expired") == 1
    assert got.label_values("fc_controller_workers", "model") == set()


async def test_a_heartbeat_resets_the_heartbeat_age(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    """The age counts from the worker's last heartbeat."""
    controller = await run_controller(local(), clock=clock)
    worker = await make_worker()
    await register(http, controller, worker)
    clock.advance(12)
    body = {"worker_name": worker.url, "queue_length": 0}
    assert await post_ok(http, controller, "/receive_heart_beat", body) == {"exist": True}
    clock.advance(2)
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_heartbeat_age_seconds", worker=worker.url) == 2
    assert got.value("fc_controller_registry_changes_total", kind="heartbeat") == 1


async def test_a_failover_is_counted(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A stream whose first worker is down reaches the second: one failover, one stream."""
    controller = await run_controller(local())
    crashed = await make_worker(crashed=True)
    healthy = await make_worker()
    for worker in (crashed, healthy):
        await post_ok(http, controller, "/register_worker", register_body(worker))
    assert len(await stream(http, controller)) == 3
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_failovers_total") == 1
    assert got.value("fc_controller_dispatch_total", model="m") == 2
    assert got.value("fc_controller_ttfc_seconds_count") == 1


async def test_two_controllers_in_one_process_keep_their_own_series(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """Each controller has its own registry, not prometheus-client's global one: traffic to
    one shows in its metrics only, and read on the loop its registry says the same."""
    busy, idle = await run_controller(local()), await run_controller(local())
    await register(http, busy, await make_worker())
    await stream(http, busy)
    busy_got, idle_got = await scrape(http, busy.url), await scrape(http, idle.url)
    assert busy_got.value("fc_controller_stream_chunks_total") == 3
    assert idle_got.value("fc_controller_stream_chunks_total") == 0
    assert idle_got.value("fc_controller_ttfc_seconds_count") == 0
    assert idle_got.label_values("fc_controller_workers", "model") == set()
    direct = Scrape.parse(generate_latest(busy.metrics.collectors).decode())
    assert direct.value("fc_controller_stream_chunks_total") == 3
    assert direct.value("fc_controller_ttfc_seconds_count") == 1
    assert b"fc_controller" not in generate_latest(REGISTRY)


async def test_a_scrape_is_encoded_off_the_event_loop(
    run_controller: RunController, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Formatting 10,000 workers' series takes over 100 ms: the collectors run in another
    thread than the loop's, so requests go on meanwhile."""
    threads: list[int] = []
    collect = ProcessCollector.collect

    def recording(self: ProcessCollector) -> Iterable[Metric]:
        threads.append(threading.get_ident())
        return collect(self)

    monkeypatch.setattr(ProcessCollector, "collect", recording)
    controller = await run_controller(local())
    got = await scrape(http, controller.url)
    assert got.value("process_cpu_seconds_total") is not None
    assert threads
    assert threading.get_ident() not in threads


def closed_to_clients(**kwargs: Any) -> ControllerConfig:
    access = Access(
        client_tokens=TokenTable.from_lines([f"prometheus:{CLIENT}"], "test"),
        worker_tokens=TokenTable.from_lines([f"w:{WORKER}"], "test"),
        **kwargs,
    )
    return local(access=access)


async def test_with_tokens_on_metrics_needs_the_client_role(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Without a token 401 (counted too), with a worker's 403, with a client token 200."""
    controller = await run_controller(closed_to_clients())
    async with http.get(f"{controller.url}/metrics") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert b"fc_controller" not in await r.read()
    headers = {"Authorization": f"Bearer {WORKER}"}
    async with http.get(f"{controller.url}/metrics", headers=headers) as r:
        assert r.status == 403
    got = await scrape(http, controller.url, CLIENT)
    assert got.value("fc_controller_requests_total", endpoint="/metrics", code="401") == 1
    assert got.value("fc_controller_requests_total", endpoint="/metrics", code="403") == 1


async def test_a_trusted_client_network_reads_metrics_without_a_token(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A browser on a --trust-clients-from network needs no token."""
    trusted = parse_networks(["127.0.0.0/8"], "--trust-clients-from")
    controller = await run_controller(closed_to_clients(trust_clients_from=trusted))
    got = await scrape(http, controller.url)
    assert got.value("fc_controller_stream_chunks_total") == 0


@pytest.mark.parametrize(
    "accept", ["text/plain; version=nonsense", "text/plain;version=1.x.0", "*/*", "\u00e9"]
)
async def test_an_odd_accept_header_gets_the_classic_format(
    run_controller: RunController, http: aiohttp.ClientSession, accept: str
) -> None:
    """Whatever Accept says, the answer is 200 in a format the text parser reads."""
    controller = await run_controller(local())
    async with http.get(f"{controller.url}/metrics", headers={"Accept": accept}) as r:
        assert r.status == 200
        Scrape.parse(await r.text())


async def test_openmetrics_is_served_to_who_asks_for_it(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Prometheus's Accept header for OpenMetrics gets OpenMetrics, which its parser reads."""
    controller = await run_controller(local())
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with http.get(f"{controller.url}/metrics", headers={"Accept": accept}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await r.text()
    # prometheus-client's OpenMetrics parser has no annotations.
    names = {f.name for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert {"fc_controller_requests", "fc_controller_ttfc_seconds"} <= names


async def test_an_embedded_controller_counts_the_host_s_responses_and_samples_the_loop(
    http: aiohttp.ClientSession,
) -> None:
    """In a host application, its own routes count under their path; the loop-lag sampler
    runs with the application."""

    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    controller = await Controller.start(app, local())
    controller.metrics.lag_interval = 0.005
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        async with http.get(f"{base}/hello") as r:
            assert r.status == 200

        async def sampled() -> bool:
            got = await scrape(http, base)
            return (got.value("fc_controller_event_loop_lag_seconds_count") or 0) >= 3

        await wait_until(sampled)
        got = await scrape(http, base)
        assert got.value("fc_controller_requests_total", endpoint="/hello", code="200") == 1
    finally:
        await server.close()


async def test_the_lag_sampler_observes_how_late_each_wake_up_was() -> None:
    """Driven by an injected clock and sleep: a wake-up 0.2 s late is observed as 0.2 s,
    one on time as 0 (never negative)."""
    now = [100.0]
    lateness = iter([0.0, 0.2, 0.05])
    seen: list[float] = []

    async def sleep(seconds: float) -> None:
        try:
            now[0] += seconds + next(lateness)
        except StopIteration:
            raise asyncio.CancelledError from None

    def clock() -> float:
        return now[0]

    with pytest.raises(asyncio.CancelledError):
        await sample_loop_lag(seen.append, 0.5, clock=clock, sleep=sleep)
    assert seen == pytest.approx([0.0, 0.2, 0.05])


def test_the_change_feed_counts_removals_by_reason() -> None:
    """The feed counts every change by kind and removals by why, listener or not."""
    feed = ChangeFeed(retention=2)
    info = WorkerInfo("http://w", ("m",), 1.0, True)
    for reason in ("expired", "expired", "unregistered"):
        feed.append(ChangeKind.REGISTERED, info, 0, 0.0, "registered")
        feed.append(ChangeKind.REMOVED, info, 0, 0.0, reason)
    assert feed.removals == {"expired": 2, "unregistered": 1}
    assert feed.counts[ChangeKind.REGISTERED] == 3
    assert feed.counts[ChangeKind.HEARTBEAT] == 0
