"""How long the status views hold the event loop with a large registry.

Registers WORKERS workers (default 10,000) in a controller's registry, serves only the
three status routes (``/status``, ``/api/workers``, ``/api/models``) on a loopback port,
and fetches each a few times with curl while a task on the loop measures its
lag (how late a 1 ms sleep wakes) and the handlers time the CPU of each stretch they run
without yielding (on a busy machine the lag also counts other processes; the stretch does
not, though it does count a garbage collection that falls in it). Once with the views
built in slices (the default, ``controller.edge.status.SLICE`` workers between two yields
to the loop) and once in one go, so the table shows what the slicing buys. The answer time
includes starting curl. Prints one table; takes about ten seconds. Needs curl.

    .venv/bin/python benchmarks/status_views.py [--workers N] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiohttp import web

from controller import Controller, ControllerConfig, WorkerInfo
from controller.edge.access import Handler
from controller.edge.status import SLICE, StatusRoutes

PATHS = ("/status", "/status?rows=100000", "/api/workers", "/api/models")


async def lag_monitor(stop: asyncio.Event, lags: list[float]) -> None:
    """Record how late each 1 ms sleep wakes, until ``stop`` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)


class Stretches:
    """The CPU time (of the loop's thread, so other processes on a busy machine do not
    count) of each stretch a handler runs without yielding to the loop."""

    def __init__(self) -> None:
        self.mark = 0.0
        self.longest = 0.0

    def start(self) -> None:
        self.mark = time.thread_time()

    def cut(self) -> None:
        now = time.thread_time()
        self.longest = max(self.longest, now - self.mark)
        self.mark = now

    async def pause(self) -> None:
        self.cut()
        await asyncio.sleep(0)
        self.start()

    def timed(self, handler: Handler) -> Handler:
        async def timed(request: web.Request) -> web.StreamResponse:
            self.start()
            try:
                return await handler(request)
            finally:
                self.cut()

        return timed


async def fetch(url: str, n: int, times: list[float]) -> None:
    """GET ``url`` ``n`` times from a process of its own (a thread here would take turns
    with the loop for the interpreter lock and count as loop lag)."""
    for _ in range(n):
        start = time.perf_counter()
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sf", "-o", "/dev/null", "--max-time", "60", url
        )
        if await curl.wait() != 0:
            raise SystemExit(f"curl {url} failed")
        times.append(time.perf_counter() - start)


async def measure(controller: Controller, slice_size: int, requests: int) -> list[tuple[str, ...]]:
    app = web.Application()
    stretches = Stretches()
    routes = StatusRoutes(controller.router, slice_size=slice_size, pause=stretches.pause)
    for path, handler in routes.routes().items():
        app.router.add_get(path, stretches.timed(handler))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rows: list[tuple[str, ...]] = []
    try:
        for path in PATHS:
            lags: list[float] = []
            times: list[float] = []
            stretches.longest = 0.0
            stop = asyncio.Event()
            monitor = asyncio.create_task(lag_monitor(stop, lags))
            url = f"http://127.0.0.1:{port}{path}"
            await fetch(url, requests, times)
            stop.set()
            await monitor
            label = "one go" if slice_size >= 10**9 else str(slice_size)
            rows.append(
                (
                    path,
                    label,
                    f"{statistics.median(times) * 1000:.0f} ms",
                    f"{stretches.longest * 1000:.1f} ms",
                    f"{max(lags) * 1000:.1f} ms",
                )
            )
    finally:
        await runner.cleanup()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    controller = Controller(
        ControllerConfig(max_workers=args.workers, max_workers_per_source=args.workers)
    )
    for i in range(args.workers):
        name = f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:21002"
        controller.registry.register(WorkerInfo(name, (f"model-{i % 50}",), 1.0, True), i % 4)
    rows: list[tuple[str, ...]] = [
        ("path", "slice", "answer p50", "longest stretch (CPU)", "longest loop lag")
    ]
    for slice_size in (SLICE, 10**9):
        rows += await measure(controller, slice_size, args.requests)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{args.workers} workers, {args.requests} requests per path")
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))


if __name__ == "__main__":
    asyncio.run(main())
