"""A bounded soak: a real controller process under mixed load while workers die and return.

Run by hand for a longer look (loopback only)::

    python -m tests.soak --duration 120

It prints a small table: requests served, errors clients saw (in-band and HTTP), worker
deaths, and the controller's resident memory (from /proc) at start, after warm-up and at
the end. ``pytest -m soak`` (a step of ``.ci/run``, not of the default run) runs a short
variant from ``tests/test_soak.py``, and the long one too when ``FC_SOAK_SECONDS`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
from typing import Any

import aiohttp
import attrs

from .conftest import ControllerProcess, FakeWorker

#: the controller's settings for the soak: short enough that expiry and ejection happen
CONTROLLER_FLAGS = (
    "--heart-beat-expiration",
    "3",
    "--worker-api-timeout",
    "2",
    "--drain-timeout",
    "2",
    "--log-level",
    "warning",
)
HEARTBEAT_INTERVAL = 0.5


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@attrs.define
class SoakReport:
    seconds: float = 0.0
    #: requests by kind that got an answer
    served: collections.Counter[str] = attrs.Factory(collections.Counter)
    streams_whole: int = 0
    #: in-band error codes seen at the end of streams
    in_band: collections.Counter[int] = attrs.Factory(collections.Counter)
    #: HTTP statuses other than 200
    http_errors: collections.Counter[int] = attrs.Factory(collections.Counter)
    #: requests that got no HTTP answer at all, by exception type
    connection_errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    #: streams that were not a sequence of NUL-terminated JSON messages
    malformed: int = 0
    clients_left: int = 0
    worker_deaths: int = 0
    #: workers registered and serving right now, and how long none was
    workers_up: int = 0
    all_down_since: float | None = None
    all_down_seconds: float = 0.0
    #: 50005 answers although some worker was up for the whole request (should be none)
    no_worker_while_up: int = 0
    #: deaths so far, to tell whether a worker died during a request
    deaths_seen: int = 0
    rss_start: float = 0.0
    rss_warm: float = 0.0
    rss_end: float = 0.0
    rss_peak: float = 0.0
    #: (seconds into the run, MiB) about every 10 s
    rss_series: list[tuple[float, float]] = attrs.Factory(list)

    def came_up(self, now: float) -> None:
        self.workers_up += 1
        if self.all_down_since is not None:
            self.all_down_seconds += now - self.all_down_since
            self.all_down_since = None

    def went_down(self, now: float) -> None:
        self.workers_up -= 1
        self.deaths_seen += 1
        if not self.workers_up:
            self.all_down_since = now

    @property
    def total(self) -> int:
        return sum(self.served.values())

    def table(self) -> str:
        rows = [
            ("duration", f"{self.seconds:.1f} s"),
            ("requests served", f"{self.total} ({self.total / max(self.seconds, 1e-9):.0f}/s)"),
            ("  by kind", ", ".join(f"{k} {v}" for k, v in sorted(self.served.items()))),
            ("streams whole", str(self.streams_whole)),
            ("in-band errors", _counts(self.in_band)),
            ("HTTP errors", _counts(self.http_errors)),
            ("connection errors", _counts(self.connection_errors)),
            ("malformed streams", str(self.malformed)),
            ("clients that left", str(self.clients_left)),
            ("worker deaths", str(self.worker_deaths)),
            ("all workers down", f"{self.all_down_seconds:.1f} s"),
            ("50005 while a worker was up", str(self.no_worker_while_up)),
            (
                "controller RSS (MiB)",
                f"start {self.rss_start:.1f}, warm {self.rss_warm:.1f}, "
                f"end {self.rss_end:.1f}, peak {self.rss_peak:.1f}",
            ),
        ]
        series = ", ".join(f"{t:.0f}s {mib:.1f}" for t, mib in self.rss_series)
        rows.append(("  RSS over time", series))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _counts(counter: collections.Counter[Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "0"


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with http.post(url, json=body) as r:
        r.raise_for_status()
        return await r.json()


async def _worker_life(
    controller: ControllerProcess,
    worker: FakeWorker,
    http: aiohttp.ClientSession,
    rng: random.Random,
    stop: asyncio.Event,
    report: SoakReport,
) -> None:
    """Heartbeat like a FastChat worker; now and then die (abruptly) and come back."""
    url = worker.url
    port = int(url.rsplit(":", 1)[1])
    body = {"worker_name": url, "check_heart_beat": True, "worker_status": worker.status()}
    await _post(http, f"{controller.url}/register_worker", body)
    loop = asyncio.get_running_loop()
    report.came_up(loop.time())
    while not stop.is_set():
        dies_at = loop.time() + rng.uniform(2.0, 6.0)
        while loop.time() < dies_at and not stop.is_set():
            beat = {"worker_name": url, "queue_length": worker.active}
            answer = await _post(http, f"{controller.url}/receive_heart_beat", beat)
            if not answer["exist"]:
                await _post(http, f"{controller.url}/register_worker", body)
            # The heartbeat period: load, not synchronisation.
            await asyncio.sleep(HEARTBEAT_INTERVAL)
        if stop.is_set():
            return
        report.went_down(loop.time())
        await worker.stop()
        report.worker_deaths += 1
        await asyncio.sleep(rng.uniform(0.5, 4.0))
        await worker.start(port)
        # A restarted FastChat worker registers again at start-up.
        await _post(http, f"{controller.url}/register_worker", body)
        report.came_up(loop.time())


async def _client(
    controller: ControllerProcess,
    http: aiohttp.ClientSession,
    rng: random.Random,
    stop: asyncio.Event,
    report: SoakReport,
) -> None:
    url = controller.url
    while not stop.is_set():
        roll = rng.random()
        try:
            if roll < 0.70:
                if await _stream(http, url, rng, report, leave=False) == 50005:
                    # No worker at all: a user waits a moment before trying again, rather
                    # than spinning on instant answers.
                    await asyncio.sleep(0.1)
            elif roll < 0.75:
                await _stream(http, url, rng, report, leave=True)
            elif roll < 0.90:
                await _call(http, f"{url}/get_worker_address", {"model": "m"}, "address", report)
            elif roll < 0.97:
                await _call(http, f"{url}/list_models", None, "list_models", report)
            else:
                await _call(http, f"{url}/refresh_all_workers", None, "refresh", report)
        except (aiohttp.ClientError, TimeoutError) as e:
            report.connection_errors[type(e).__name__] += 1


async def _call(
    http: aiohttp.ClientSession, url: str, body: Any, kind: str, report: SoakReport
) -> None:
    async with http.post(url, json=body) as r:
        await r.read()
        if r.status != 200:
            report.http_errors[r.status] += 1
            return
    report.served[kind] += 1


async def _stream(
    http: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    report: SoakReport,
    *,
    leave: bool,
) -> int | None:
    """One stream; returns its in-band error code, if it ended with one."""
    up_throughout = report.workers_up > 0
    deaths_before = report.deaths_seen
    tokens = rng.randint(1, 20)
    body = {"model": "m", "prompt": "soak", "fake": {"tokens": tokens, "token_delay": 0.01}}
    async with http.post(f"{url}/worker_generate_stream", json=body) as r:
        if r.status != 200:
            report.http_errors[r.status] += 1
            await r.read()
            return None
        if leave:
            await r.content.readuntil(b"\0")
            r.close()
            report.clients_left += 1
            report.served["stream"] += 1
            return None
        raw = await r.read()
    report.served["stream"] += 1
    try:
        if not raw.endswith(b"\0"):
            raise ValueError("not NUL-terminated")
        messages = [json.loads(piece) for piece in raw.split(b"\0") if piece]
    except ValueError:
        report.malformed += 1
        return None
    code = messages[-1].get("error_code", 0) if messages else None
    if code:
        report.in_band[code] += 1
        if code == 50005 and up_throughout and report.deaths_seen == deaths_before:
            report.no_worker_while_up += 1
        return int(code)
    if len(messages) == tokens:
        report.streams_whole += 1
    else:
        report.malformed += 1
    return None


async def run_soak(
    duration: float,
    *,
    workers: int = 4,
    concurrency: int = 24,
    seed: int | None = None,
    warm_up: float | None = None,
) -> SoakReport:
    """Run the soak for ``duration`` seconds; every process and server it starts is stopped."""
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    report = SoakReport()
    warm_up = min(duration / 4, 10.0) if warm_up is None else warm_up
    controller = await ControllerProcess.start(*CONTROLLER_FLAGS)
    fakes: list[FakeWorker] = []
    try:
        report.rss_start = rss_mib(controller.pid)
        for _ in range(workers):
            fakes.append(await FakeWorker(queue_length=0).start())
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=concurrency + workers * 2)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            tasks = [
                asyncio.create_task(
                    _worker_life(controller, w, http, random.Random(rng.random()), stop, report)
                )
                for w in fakes
            ]
            tasks += [
                asyncio.create_task(
                    _client(controller, http, random.Random(rng.random()), stop, report)
                )
                for _ in range(concurrency)
            ]
            loop = asyncio.get_running_loop()
            started = loop.time()
            # Sample memory once a second while the load runs.
            while (elapsed := loop.time() - started) < duration:
                await asyncio.sleep(min(1.0, duration - elapsed))
                rss = rss_mib(controller.pid)
                report.rss_peak = max(report.rss_peak, rss)
                now = loop.time() - started
                if not report.rss_series or now - report.rss_series[-1][0] >= 9.5:
                    report.rss_series.append((now, rss))
                if not report.rss_warm and loop.time() - started >= warm_up:
                    report.rss_warm = rss
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    raise RuntimeError("a soak task failed") from failed[0].exception()
            stop.set()
            await asyncio.gather(*tasks)
            report.seconds = loop.time() - started
            report.rss_end = rss_mib(controller.pid)
            async with http.get(f"{controller.url}/test_connection") as r:
                assert await r.json() == "success"
        controller.signal()
        code = await controller.wait(10)
        if code != 0:
            raise RuntimeError(f"controller exited with {code}: {controller.lines[-10:]}")
    finally:
        await controller.kill()
        for w in fakes:
            await w.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    report = asyncio.run(
        run_soak(args.duration, workers=args.workers, concurrency=args.concurrency, seed=args.seed)
    )
    print(report.table())
    bad = (
        report.malformed + sum(report.http_errors.values()) + sum(report.connection_errors.values())
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
