"""Python load generators for the scenarios wrk cannot drive (aiohttp + uvloop).

Subcommands, each printing one JSON object on stdout when done:

- ``streams``: C concurrent closed-loop NUL-framed streams; chunks/s, time to first chunk.
- ``paced``: requests sent on a fixed schedule; latency is measured from the *scheduled* send
  time, so a server that stalls is charged for every request it held up (no coordinated
  omission, unlike a closed-loop tool such as wrk).
- ``register``: register many fake workers (with ``worker_status``, so nothing is probed).
- ``trigger``: every interval, fire ``/register_worker`` for a worker without its status (so
  the controller must probe it) without waiting for the answer.

``--cpu-pid`` (repeatable) makes ``streams`` and ``paced`` sample those processes' CPU time
exactly at the edges of the measurement window; the generator reports its own CPU too.
``--start-at`` opens their window at a ``time.monotonic()`` instant instead of after
``--warmup`` (several processes then measure the same window), and ``--local-addr`` picks
the address they connect from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import core_busy, core_times, cpu_seconds


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of ``values`` (nearest rank), in the unit given."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1], "count": n}


class Window:
    """CPU samples of the watched processes, the generator and the cores at two instants."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.started = 0.0
        self.ended = 0.0
        self._cpu0: list[float] = []
        self._cpu1: list[float] = []
        self._own0 = 0.0
        self._own1 = 0.0
        self._cores0: dict[int, tuple[float, float]] = {}
        self._cores1: dict[int, tuple[float, float]] = {}

    def start(self) -> None:
        self._cpu0 = [cpu_seconds(p) for p in self.pids]
        self._own0 = own_cpu()
        self._cores0 = core_times()
        self.started = time.monotonic()

    def end(self) -> None:
        self.ended = time.monotonic()
        self._cpu1 = [cpu_seconds(p) for p in self.pids]
        self._own1 = own_cpu()
        self._cores1 = core_times()

    def report(self) -> dict[str, Any]:
        seconds = self.ended - self.started
        own = self._own1 - self._own0
        return {
            "window_s": seconds,
            "cpu_s": {
                str(p): b - a for p, a, b in zip(self.pids, self._cpu0, self._cpu1, strict=True)
            },
            "loadgen_cpu_s": own,
            "loadgen_cpu_util": own / seconds if seconds > 0 else None,
            "core_busy": {str(k): v for k, v in core_busy(self._cores0, self._cores1).items()},
        }


# ---------------------------------------------------------------------------------- streams


class StreamStats:
    def __init__(self) -> None:
        self.measuring = False
        self.chunks = 0
        self.bytes = 0
        self.ttfc: list[float] = []
        self.completed = 0
        self.bad = 0
        self.errors = 0
        self.error_samples: list[str] = []

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text)


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, expect: int, stats: StreamStats
) -> None:
    started = time.perf_counter()
    counted = stats.measuring
    chunks = 0
    tail = b""
    first = True
    async with session.post(
        url, data=body, headers={"Content-Type": "application/json"}
    ) as response:
        if response.status != 200:
            stats.error(f"HTTP {response.status}")
            await response.read()
            return
        async for data in response.content.iter_any():
            n = data.count(b"\0")
            if n:
                if first:
                    first = False
                    # Every first chunk that arrives inside the window counts, whenever its
                    # stream started: with slow streams none may start inside a short window.
                    if stats.measuring:
                        stats.ttfc.append(time.perf_counter() - started)
                chunks += n
                if stats.measuring:
                    stats.chunks += n
                    stats.bytes += len(data)
            tail = (tail + data)[-8192:]
    pieces = tail.split(b"\0")
    try:
        last = json.loads(pieces[-2]) if len(pieces) >= 2 and pieces[-1] == b"" else None
    except ValueError:
        last = None
    if chunks != expect or not isinstance(last, dict) or last.get("error_code") != 0:
        stats.bad += 1
        if len(stats.error_samples) < 5:
            stats.error_samples.append(f"{chunks} chunks, last {tail[-200:]!r}")
    elif counted:
        stats.completed += 1


async def stream_client(
    session: aiohttp.ClientSession,
    urls: list[str],
    index: int,
    body: bytes,
    expect: int,
    stats: StreamStats,
    stop: asyncio.Event,
    delay: float,
) -> None:
    await asyncio.sleep(delay)
    n = index
    while not stop.is_set():
        url = urls[n % len(urls)]
        n += 1
        try:
            await one_stream(session, url, body, expect, stats)
        except (aiohttp.ClientError, TimeoutError) as e:
            stats.error(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.05)


def warmup(args: argparse.Namespace) -> float:
    """Seconds until the measurement window opens: ``--warmup``, or until ``--start-at``
    (a ``time.monotonic()`` instant, the system-wide clock, so that several processes
    measure the same window)."""
    if args.start_at is None:
        return float(args.warmup)
    return max(0.0, args.start_at - time.monotonic())


def local(args: argparse.Namespace) -> tuple[str, int] | None:
    """The address connections are made from (``--local-addr``), or the system's choice."""
    return None if args.local_addr is None else (args.local_addr, 0)


def authorization(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


async def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    stats = StreamStats()
    stop = asyncio.Event()
    window = Window(args.cpu_pid)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, local_addr=local(args))
    body = args.body.encode()
    session = aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=authorization(args.token)
    )
    async with session:
        tasks = [
            asyncio.create_task(
                stream_client(
                    session,
                    args.url,
                    i,
                    body,
                    args.expect_chunks,
                    stats,
                    stop,
                    # Spread the starts so the streams do not run in lockstep waves.
                    args.stagger * i / args.concurrency,
                )
            )
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(warmup(args))
        stats.measuring = True
        window.start()
        await asyncio.sleep(args.duration)
        stats.measuring = False
        window.end()
        stop.set()
        # Let in-flight streams finish so no one sees a reset, but never wait for long.
        _, pending = await asyncio.wait(tasks, timeout=args.drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    seconds = window.ended - window.started
    return {
        "concurrency": args.concurrency,
        "chunks": stats.chunks,
        "chunks_per_s": stats.chunks / seconds,
        "bytes_per_s": stats.bytes / seconds,
        "streams_completed": stats.completed,
        "streams_bad": stats.bad,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "unfinished_at_drain": len(pending),
        "ttfc_ms": {
            k: (v * 1000 if isinstance(v, float) else v) for k, v in percentiles(stats.ttfc).items()
        },
        **window.report(),
    }


# ----------------------------------------------------------------------------------- paced


async def run_paced(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop: one task per scheduled request, at most ``connections`` in flight.

    Requests leave on schedule whatever the server does, so a stall delays every request
    scheduled during it (they wait for a connection from the pool, and that wait is part of
    their latency). Latency is measured from the moment the request's task starts; how late
    the generator itself started it (event-loop timer granularity is about 1 ms) is reported
    separately as ``schedule_lag_ms``.
    """
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    samples: list[str] = []
    window = Window(args.cpu_pid)
    body = args.body.encode()
    headers = {"Content-Type": "application/json", **authorization(args.token)}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.connections, local_addr=local(args))
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution

    async def one(session: aiohttp.ClientSession, scheduled: float, counted: bool) -> None:
        nonlocal errors
        sent = clock()
        ok = False
        try:
            async with session.post(args.url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
                if not ok and len(samples) < 5:
                    samples.append(f"HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            if len(samples) < 5:
                samples.append(f"{type(e).__name__}: {e}")
        if counted:
            # A failure counts at the time it failed too, so a stall cannot hide in `errors`.
            latencies.append(clock() - sent)
            lags.append(sent - scheduled)
            errors += not ok

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        t0 = clock()
        begin = t0 + warmup(args)
        end = begin + args.duration
        interval = 1 / args.rate
        total = int((end - t0) / interval)
        i = 0
        started = False
        while i < total:
            now = clock()
            # Timers fire up to ~1 ms late: start everything that is due in one go.
            while i < total and (scheduled := t0 + i * interval) <= now:
                if not started and scheduled >= begin:
                    started = True
                    window.start()
                tasks.append(asyncio.create_task(one(session, scheduled, started)))
                i += 1
            await asyncio.sleep(max(0.0, t0 + i * interval - clock()))
        await asyncio.sleep(max(0.0, end - clock()))
        window.end()
        _, pending = await asyncio.wait(tasks, timeout=args.timeout + 2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "rate": args.rate,
        "connections": args.connections,
        "requests": len(latencies),
        "errors": errors,
        "error_samples": samples,
        "latency_ms": {
            k: (v * 1000 if isinstance(v, float) else v) for k, v in percentiles(latencies).items()
        },
        "over_100ms": sum(1 for x in latencies if x > 0.1),
        "schedule_lag_ms": {
            k: (v * 1000 if isinstance(v, float) else v) for k, v in percentiles(lags).items()
        },
        **window.report(),
    }


# -------------------------------------------------------------------------------- register


async def run_register(args: argparse.Namespace) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.count):
        queue.put_nowait(i)
    failures = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            payload = {
                "worker_name": f"{args.prefix}{i}",
                "check_heart_beat": False,
                "worker_status": {
                    "model_names": [f"{args.model_prefix}{i % args.models}"],
                    "speed": 1,
                    "queue_length": 0,
                },
            }
            async with session.post(f"{args.url}/register_worker", json=payload) as response:
                await response.read()
                failures += response.status != 200

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
    return {
        "registered": args.count - failures,
        "failures": failures,
        "seconds": time.monotonic() - started,
    }


# --------------------------------------------------------------------------------- trigger


async def run_trigger(args: argparse.Namespace) -> dict[str, Any]:
    """One request at a time, the next at least ``interval`` after the previous was sent."""
    answered = 0
    failed = 0
    durations: list[float] = []
    clock = time.perf_counter
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        end = clock() + args.duration
        while (started := clock()) < end:
            try:
                async with session.post(
                    args.url, data=args.body.encode(), headers=headers
                ) as response:
                    await response.read()
                answered += 1
                durations.append(clock() - started)
            except (aiohttp.ClientError, TimeoutError):
                failed += 1
            await asyncio.sleep(max(0.0, started + args.interval - clock()))
    return {
        "sent": answered + failed,
        "answered": answered,
        "failed": failed,
        "answer_s": percentiles(durations),
    }


# ------------------------------------------------------------------------------------ main


def window_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--start-at",
        type=float,
        help="open the window at this time.monotonic() instant (instead of --warmup)",
    )
    parser.add_argument("--local-addr", help="connect from this address, e.g. 127.0.0.2")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    streams = sub.add_parser("streams")
    streams.add_argument("--url", action="append", required=True, help="repeatable; rotated")
    streams.add_argument("--concurrency", type=int, required=True)
    streams.add_argument("--body", required=True)
    streams.add_argument("--expect-chunks", type=int, required=True)
    streams.add_argument("--warmup", type=float, default=3.0)
    streams.add_argument("--duration", type=float, default=20.0)
    streams.add_argument("--drain", type=float, default=10.0)
    streams.add_argument(
        "--stagger", type=float, default=0.0, help="spread stream starts over this many seconds"
    )
    streams.add_argument("--cpu-pid", type=int, action="append", default=[])
    streams.add_argument("--token", help="sent as a bearer token")
    window_flags(streams)

    paced = sub.add_parser("paced")
    paced.add_argument("--url", required=True)
    paced.add_argument("--body", required=True)
    paced.add_argument("--rate", type=float, required=True, help="requests per second")
    paced.add_argument("--connections", type=int, default=8)
    paced.add_argument("--warmup", type=float, default=1.0)
    paced.add_argument("--duration", type=float, default=10.0)
    paced.add_argument("--timeout", type=float, default=30.0)
    paced.add_argument("--cpu-pid", type=int, action="append", default=[])
    paced.add_argument("--token", help="sent as a bearer token")
    window_flags(paced)

    register = sub.add_parser("register")
    register.add_argument("--url", required=True, help="controller base URL")
    register.add_argument("--count", type=int, required=True)
    register.add_argument("--models", type=int, required=True)
    register.add_argument("--prefix", default="http://127.0.0.1:1/w")
    register.add_argument("--model-prefix", default="m")
    register.add_argument("--concurrency", type=int, default=16)

    trigger = sub.add_parser("trigger")
    trigger.add_argument("--url", required=True)
    trigger.add_argument("--body", required=True)
    trigger.add_argument("--interval", type=float, default=1.0)
    trigger.add_argument("--duration", type=float, required=True)
    trigger.add_argument("--timeout", type=float, default=20.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runners = {
        "streams": run_streams,
        "paced": run_paced,
        "register": run_register,
        "trigger": run_trigger,
    }
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(runners[args.command](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
