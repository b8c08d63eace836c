#!/usr/bin/env python3
"""Replicas sharing one registry in Redis (issue 18), against the memory registry.

    .venv/bin/python benchmarks/replicas.py            # about three minutes
    .venv/bin/python benchmarks/replicas.py --quick    # under a minute

Needs ``redis-server`` on the PATH (Debian: ``apt-get install redis-server``); started here
on a free loopback port with persistence off, and stopped. Three measurements, printed as
a table (``--json PATH`` also writes them); the modes take ``--rounds`` turns each and each
figure is the median of its rounds:

1. **dispatch CPU per request**: a controller process (``python -m controller``) with
   ``--workers`` workers of one model, asked ``/get_worker_address`` ``--requests`` times
   by ``--concurrency`` clients in this process; the controller's CPU time (from /proc)
   per request, memory registry against a Redis registry with a second replica attached
   (each round the median of three passes; in memory mode an idle second controller runs
   too, and Redis, so that both modes share the two cores with the same processes);
2. **heartbeats per second per replica**: the same controller taking heartbeats from
   ``--concurrency`` clients for ``--seconds``, and its CPU per heartbeat (and so how many
   one core of it takes); in Redis mode each one is also written to Redis and applied by
   the other replica, on the same two cores;
3. **cross-replica propagation**: a registration (and later the unregistration) made at
   replica A, one at a time, and the time until replica B answers accordingly; and a
   heartbeat at A reporting a new queue length until B's ``/api/workers`` shows it;
   polled every millisecond: p50, p99 and max over ``--changes`` of each.

Only loopback; every load is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processes import free_port
from procstat import cpu_seconds


def worker(n: int) -> str:
    return f"http://10.9.{n // 256}.{n % 256}:21002"


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def controller(logdir: Path, *args: str) -> AsyncIterator[tuple[str, int]]:
    """A controller process; its URL and pid."""
    port = free_port()
    log = open(logdir / f"controller-{port}.log", "wb")  # noqa: SIM115 (closed below)
    command = (sys.executable, "-m", "controller", "--host", "127.0.0.1", "--port", str(port))
    process = await asyncio.create_subprocess_exec(
        *command,
        *("--heart-beat-expiration", "600", "--log-level", "warning", *args),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/test_connection") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise SystemExit(f"controller at {url} did not start; see {log.name}")
        yield url, process.pid
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
        log.close()


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with http.post(url, json=body) as r:
        if r.status != 200:
            raise SystemExit(f"{url}: {r.status} {await r.text()}")
        return json.loads(await r.read())


async def load(http: aiohttp.ClientSession, url: str, bodies: list[Any], concurrency: int) -> None:
    """POST every body, ``concurrency`` at a time."""
    queue = iter(bodies)

    async def client() -> None:
        for body in queue:
            async with http.post(url, json=body) as r:
                await r.read()

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def measure_mode(
    args: argparse.Namespace, logdir: Path, registry: str | None
) -> dict[str, float]:
    extra = () if registry is None else ("--registry", registry)
    async with contextlib.AsyncExitStack() as stack:
        url, pid = await stack.enter_async_context(controller(logdir, *extra))
        # A second controller in both modes, so the machine runs the same processes: in
        # Redis mode the other replica, in memory mode an idle one.
        await stack.enter_async_context(controller(logdir, *extra))
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        for n in range(args.workers):
            body = {
                "worker_name": worker(n),
                "check_heart_beat": True,
                "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0},
            }
            await post(http, url + "/register_worker", body)
        ask = [{"model": "m"}] * args.requests
        await load(http, url + "/get_worker_address", ask[:1000], args.concurrency)
        rounds = []
        for _ in range(3):
            cpu = cpu_seconds(pid)
            await load(http, url + "/get_worker_address", ask, args.concurrency)
            rounds.append((cpu_seconds(pid) - cpu) / args.requests)
        # Heartbeats: as many as the clients get answered in the time.
        done = 0
        stop = time.monotonic() + args.seconds
        rng = random.Random(1)

        async def beat() -> None:
            nonlocal done
            while time.monotonic() < stop:
                body = {"worker_name": worker(rng.randrange(args.workers)), "queue_length": 1}
                async with http.post(url + "/receive_heart_beat", json=body) as r:
                    await r.read()
                done += 1

        cpu = cpu_seconds(pid)
        started = time.monotonic()
        await asyncio.gather(*(beat() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        beat_cpu = cpu_seconds(pid) - cpu
    return {
        "dispatch_cpu_us": statistics.median(rounds) * 1e6,
        "heartbeats_per_s": done / elapsed,
        "heartbeat_cpu_us": beat_cpu / max(done, 1) * 1e6,
    }


async def propagation(args: argparse.Namespace, logdir: Path, registry: str) -> dict[str, Any]:
    flags = ("--registry", registry)
    async with (
        controller(logdir, *flags) as (a, _),
        controller(logdir, *flags) as (b, _),
        aiohttp.ClientSession() as http,
    ):

        async def seen_at_b(model: str, wanted: str, started: float) -> float:
            """Seconds from ``started`` (before the change was sent to A) until B agrees."""
            # Polled: B offers no event to wait on (a millisecond is the resolution).
            while True:
                answer = await post(http, b + "/get_worker_address", {"model": model})
                if answer["address"] == wanted:
                    return time.perf_counter() - started
                await asyncio.sleep(0.001)

        registered, unregistered = [], []
        for n in range(args.changes):
            name, model = worker(60000 + n), f"p{n}"
            body = {
                "worker_name": name,
                "check_heart_beat": True,
                "worker_status": {"model_names": [model], "speed": 1, "queue_length": 0},
            }
            started = time.perf_counter()
            await post(http, a + "/register_worker", body)
            registered.append(await seen_at_b(model, name, started))
            started = time.perf_counter()
            await post(http, a + "/unregister_worker", {"worker_name": name})
            unregistered.append(await seen_at_b(model, "", started))
        # A heartbeat-driven change: the queue a heartbeat at A reports, seen at B.
        name = worker(59999)
        body = {
            "worker_name": name,
            "check_heart_beat": True,
            "worker_status": {"model_names": ["hb"], "speed": 1, "queue_length": 0},
        }
        await post(http, a + "/register_worker", body)
        await seen_at_b("hb", name, time.perf_counter())
        beats = []
        for n in range(1, args.changes + 1):
            started = time.perf_counter()
            await post(http, a + "/receive_heart_beat", {"worker_name": name, "queue_length": n})
            while True:
                async with http.get(b + "/api/workers", params={"model": "hb"}) as r:
                    (seen,) = (await r.json())["workers"]
                if seen["reported_queue_length"] == n:
                    break
                await asyncio.sleep(0.001)
            beats.append(time.perf_counter() - started)
    return {
        "register": summary(registered),
        "heartbeat": summary(beats),
        "unregister": summary(unregistered),
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(tempfile.mkdtemp(prefix="fc-bench-replicas-"))
    # The modes take turns, so a change in the machine's load (other processes on two
    # cores) falls on both; each figure is the median of its rounds.
    rounds: dict[str, list[dict[str, float]]] = {"memory": [], "redis": []}
    async with redis_server() as registry:
        for _ in range(args.rounds):
            rounds["memory"].append(await measure_mode(args, logdir, None))
            rounds["redis"].append(await measure_mode(args, logdir, registry))
        spread = await propagation(args, logdir, registry)
    result: dict[str, Any] = {"propagation": spread, "logs": str(logdir), "rounds": rounds}
    for mode, figures in rounds.items():
        result[mode] = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        result[mode]["heartbeat_capacity"] = 1e6 / result[mode]["heartbeat_cpu_us"]
    return result


def print_table(result: dict[str, Any]) -> None:
    memory, shared = result["memory"], result["redis"]
    print("| measurement | memory registry | Redis registry (2 replicas) | ratio |")
    print("|---|---|---|---|")
    rows = (
        ("dispatch CPU per /get_worker_address (µs)", "dispatch_cpu_us"),
        ("heartbeats per second per replica", "heartbeats_per_s"),
        ("CPU per heartbeat (µs)", "heartbeat_cpu_us"),
        ("heartbeats per second per core of the replica (1 / CPU)", "heartbeat_capacity"),
    )
    for label, key in rows:
        ratio = shared[key] / memory[key] if memory[key] else float("nan")
        print(f"| {label} | {memory[key]:.1f} | {shared[key]:.1f} | {ratio:.2f} |")
    print()
    print("| propagation A -> B | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|")
    for kind, figures in result["propagation"].items():
        p50, p99, top = figures["p50_ms"], figures["p99_ms"], figures["max_ms"]
        print(f"| {kind} | {p50:.1f} | {p99:.1f} | {top:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and changes")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each mode")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.changes, args.rounds = 5000, 2.0, 100, 1
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = asyncio.run(main_async(args))
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
