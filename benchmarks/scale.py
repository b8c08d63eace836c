#!/usr/bin/env python3
"""Registry scale (issue 16): dispatch and the expiry sweep with 20,000 workers.

    .venv/bin/python benchmarks/scale.py            # about 3 minutes
    .venv/bin/python benchmarks/scale.py --quick    # under a minute
    .venv/bin/python benchmarks/scale.py --src /tmp/old   # an exported older revision

Run it with the interpreter of a venv that has this repository installed (the project's
``.venv``); ``--src DIR`` imports ``controller`` from DIR instead, in process and in the
controller processes, so two revisions can be compared (``git archive REV | tar -x -C DIR``).
Four measurements, printed as tables (``--json PATH`` also writes them):

1. **dispatch in process**: ``Router.dispatch(model, by_address=True)``, the call
   ``/get_worker_address`` makes, timed per call at 10 workers of one model, 20,000 workers
   over 100 models (200 each, the model of each call in turn) and 1,000 workers of one
   model, for every dispatch method (p50 and p99 of each call's wall time, and the mean
   CPU time per call, which a busy machine inflates less);
2. **/get_worker_address over HTTP**: a controller in its own process
   (``python -m controller``, uvloop), its workers loaded from a state file at start-up,
   and one client (another process) sending one request at a time: latency p50 / p99 /
   max at the same sizes, and the controller's CPU time per request (from /proc);
3. **the sweep in process**, under uvloop: a controller whose 20,000 workers over 100
   models, restored from a state file, expire together, its log going to a file; a task
   that sleeps 1 ms and measures how late it wakes gives the loop's largest stall from
   half a second before the expiry to a second after the registry is empty (and, apart,
   the longest garbage collection meanwhile), next to the largest in a quiet second;
4. **the sweep seen from outside**: a controller process whose 20,000 workers (restored
   from a state file) all expire together a few seconds after it starts, while a client sends
   ``/get_worker_address`` one at a time: the slowest answer in the 4 s around the
   expiry, next to the slowest in a quiet second before it.

Only loopback; every load is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SIZES = ((10, 1), (20_000, 100), (1_000, 1))
SWEEP_FLEET = 20_000
SWEEP_MODELS = 100
EXPIRATION = 90.0


def address(n: int) -> str:
    return f"http://10.{n // 65536}.{n // 256 % 256}.{n % 256}:21002"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


# -------------------------------------------------------------------- 1. in process


def dispatch_in_process(count: int, models: int, method: str, calls: int) -> dict[str, float]:
    from controller.decisions.models import DispatchMethod, WorkerInfo
    from controller.decisions.registry import Registry
    from controller.decisions.routing import Router

    registry = Registry(EXPIRATION, time.monotonic, worker_slots=5)
    for n in range(count):
        registry.register(WorkerInfo(address(n), (f"m{n % models}",), 1, True), 0)
    router = Router(registry, DispatchMethod(method), rng=random.Random(1))
    names = [f"m{i % models}" for i in range(calls)]
    dispatch = router.dispatch
    clock = time.perf_counter_ns
    for model in names[: calls // 10]:  # warm-up
        dispatch(model, by_address=True)
    took: list[float] = []
    cpu = time.thread_time()
    for model in names:
        start = clock()
        dispatch(model, by_address=True)
        took.append((clock() - start) / 1000)
    # CPU time is what a busy machine does not inflate by preempting this process.
    cpu_us = (time.thread_time() - cpu) / calls * 1e6
    return {"p50_us": percentile(took, 0.5), "p99_us": percentile(took, 0.99), "cpu_us": cpu_us}


# ------------------------------------------------------------- controller processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def state_file(path: Path, count: int, models: int, *, check: bool, beat: float) -> None:
    """A state file holding ``count`` workers over ``models``, last heard of at ``beat``."""
    workers = [
        {
            "worker_name": address(n),
            "model_names": [f"m{n % models}"],
            "speed": 1,
            "queue_length": 0,
            "check_heart_beat": check,
            "multimodal": False,
            "last_heart_beat": beat,
        }
        for n in range(count)
    ]
    path.write_text(json.dumps({"version": 1, "saved_at": beat, "workers": workers}))


class ControllerProcess:
    """``python -m controller`` on a free loopback port, its log in a file."""

    def __init__(self, src: str | None, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = dict(os.environ)
        if src is not None:
            self.env["PYTHONPATH"] = src
        self.log = workdir / f"controller-{self.port}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ControllerProcess:
        import aiohttp

        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                # Not from the repository's root: ``-m`` would import its controller/
                # from the working directory whatever PYTHONPATH says.
                sys.executable,
                "-m",
                "controller",
                *self.args,
                env=self.env,
                stderr=log,
                cwd=self.log.parent,
            )
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/test_connection") as r:
                        if r.status == 200:
                            return self
                if self.process.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"controller did not start; see {self.log}")

    def cpu_seconds(self) -> float:
        """The controller's CPU time so far (user and system, from /proc)."""
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def one_at_a_time(
    url: str, models: int, until: Callable[[int, float], bool], *, require: bool = True
) -> list[float]:
    """``/get_worker_address`` latencies (ms), one request at a time, until ``until(sent,
    elapsed)`` holds; each answer must name a worker if ``require``."""
    import aiohttp

    took: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        sent = 0
        while not until(sent, time.perf_counter() - started):
            body = {"model": f"m{sent % models}"}
            t = time.perf_counter()
            async with http.post(f"{url}/get_worker_address", json=body) as r:
                answer = await r.json()
            took.append((time.perf_counter() - t) * 1000)
            if require and not answer.get("address"):
                raise RuntimeError(f"no worker for {body}: {answer}")
            sent += 1
    return took


# ---------------------------------------------------------------------- 2. over HTTP


async def dispatch_over_http(
    src: str | None, workdir: Path, count: int, models: int, method: str, requests: int
) -> dict[str, float]:
    path = workdir / f"fleet-{count}-{models}.json"
    state_file(path, count, models, check=False, beat=time.time())
    flags = ["--dispatch-method", method, "--state-file", str(path)]
    flags += ["--max-workers", str(max(count, 10_000)), "--load-poll-interval", "0"]
    async with ControllerProcess(src, workdir, *flags, "--log-level", "warning") as c:
        await asyncio.sleep(2.0)  # the first save of the restored fleet, before measuring
        await one_at_a_time(c.url, models, lambda sent, _: sent >= requests // 5)
        cpu = c.cpu_seconds()
        took = await one_at_a_time(c.url, models, lambda sent, _: sent >= requests)
        cpu = c.cpu_seconds() - cpu
    return {
        "p50_ms": percentile(took, 0.5),
        "p99_ms": percentile(took, 0.99),
        "max_ms": max(took),
        "cpu_us": cpu / requests * 1e6,
    }


# ------------------------------------------------------------- 3. the sweep in process


class LagMonitor:
    """How late a task that sleeps 1 ms at a time wakes (the loop's stalls), and the
    longest garbage collection meanwhile (CPython's, which stops the loop too)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_gc = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._task = asyncio.create_task(self._run())

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.worst_gc = max(self.worst_gc, time.perf_counter() - self._gc_started)

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - start - 0.001)

    async def stop(self) -> tuple[float, float]:
        """The largest lag and the longest collection, in ms."""
        gc.callbacks.remove(self._gc)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.worst * 1000, self.worst_gc * 1000


async def sweep_in_process(workdir: Path) -> dict[str, float]:
    from controller import Controller, ControllerConfig

    expiration = 30.0
    path = workdir / "expiring-in-process.json"
    # Heard of last so long ago that all expire together 5 s from now.
    expires_at = time.time() + 5
    state_file(path, SWEEP_FLEET, SWEEP_MODELS, check=True, beat=expires_at - expiration)
    handler = logging.FileHandler(workdir / "sweep-in-process.log")
    logger = logging.getLogger("controller")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    config = ControllerConfig(
        host="127.0.0.1",
        port=0,
        state_file=str(path),
        max_workers=SWEEP_FLEET,
        heart_beat_expiration=expiration,
        load_poll_interval=0,
    )
    controller = await Controller.serve(config)
    try:
        await asyncio.sleep(0.5)  # the first save of the restored registry
        monitor = LagMonitor()
        await asyncio.sleep(1.0)
        quiet, _ = await monitor.stop()
        if time.time() > expires_at - 0.5:
            raise RuntimeError("the controller took too long to start; try again")
        await asyncio.sleep(expires_at - 0.5 - time.time())
        restored = len(controller.registry)
        monitor = LagMonitor()
        # The sweep runs within a second of the expiry; the saver follows.
        for _ in range(600):
            if not len(controller.registry) or time.time() > expires_at + 5:
                break
            await asyncio.sleep(0.01)
        emptied = time.time() - expires_at
        await asyncio.sleep(1.0)
        lag, lag_gc = await monitor.stop()
    finally:
        await controller.aclose()
        logger.removeHandler(handler)
        handler.close()
    return {
        "restored": restored,
        "emptied_after_s": emptied,
        "quiet_lag_ms": quiet,
        "max_lag_ms": lag,
        "max_gc_ms": lag_gc,
        "log_lines": len((workdir / "sweep-in-process.log").read_text().splitlines()),
    }


# --------------------------------------------------------- 4. the sweep from outside


async def sweep_over_http(src: str | None, workdir: Path) -> dict[str, float]:
    expiration = 30.0
    path = workdir / "expiring.json"
    # Heard of last so long ago that all expire together 10 s from now.
    expires_at = time.time() + 10
    state_file(path, SWEEP_FLEET, SWEEP_MODELS, check=True, beat=expires_at - expiration)
    flags = ["--state-file", str(path), "--max-workers", str(SWEEP_FLEET)]
    flags += ["--heart-beat-expiration", str(expiration), "--load-poll-interval", "0"]
    async with ControllerProcess(src, workdir, *flags) as c:
        quiet = await one_at_a_time(c.url, SWEEP_MODELS, lambda _, t: t >= 1.0)
        if time.time() > expires_at - 1:
            raise RuntimeError("the controller took too long to start; try again")
        await asyncio.sleep(expires_at - 1 - time.time())
        # From 1 s before the expiry to 3 s after it: the sweep runs within a second.
        # Expired workers are not dispatched to, so after the expiry the answer is
        # {"address": ""}: the latency is what matters here.
        took = await one_at_a_time(c.url, SWEEP_MODELS, lambda _, t: t >= 4.0, require=False)
    log = c.log.read_text(errors="replace")
    return {
        "quiet_max_ms": max(quiet),
        "expiry_p99_ms": percentile(took, 0.99),
        "expiry_max_ms": max(took),
        "requests": len(took),
        "log_lines": log.count("\n"),
    }


# ----------------------------------------------------------------------------- main


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    return "\n".join([f"\n{title}\n", line, rule, *body])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import controller
    from controller.decisions.models import DispatchMethod

    print(f"controller imported from {Path(controller.__file__).parent}", flush=True)
    methods = [m.value for m in DispatchMethod]
    calls = 5_000 if args.quick else 20_000
    requests = 1_000 if args.quick else 3_000
    results: dict[str, Any] = {"in_process": {}, "http": {}}
    with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
        workdir = Path(tmp)
        rows = []
        for count, models in SIZES:
            for method in methods:
                r = dispatch_in_process(count, models, method, calls)
                results["in_process"][f"{count}/{models}/{method}"] = r
                figures = [f"{r[k]:.1f}" for k in ("p50_us", "p99_us", "cpu_us")]
                rows.append([f"{count:,} / {models}", method, *figures])
        title = "Dispatch in process (Router.dispatch, us per call)"
        header = ["workers / models", "method", "p50", "p99", "CPU mean"]
        print(table(title, header, rows), flush=True)

        rows = []
        for count, models in SIZES:
            for method in ["least_time"] if args.quick else methods:
                r = await dispatch_over_http(args.src, workdir, count, models, method, requests)
                results["http"][f"{count}/{models}/{method}"] = r
                figures = [f"{r[k]:.3f}" for k in ("p50_ms", "p99_ms", "max_ms")]
                figures.append(f"{r['cpu_us']:.0f}")
                rows.append([f"{count:,} / {models}", method, *figures])
        title = "/get_worker_address over HTTP, one request at a time (latency ms)"
        header = ["workers / models", "method", "p50", "p99", "max", "controller CPU us/req"]
        print(table(title, header, rows), flush=True)

        r = await sweep_in_process(workdir)
        results["sweep"] = r
        title = f"Sweep of {SWEEP_FLEET:,} workers expiring together, in process (ms)"
        header = ["workers", "removed after s", "quiet max lag", "max lag", "longest gc", "log"]
        keys = ["emptied_after_s", "quiet_lag_ms", "max_lag_ms", "max_gc_ms"]
        figures = [f"{r[k]:.1f}" for k in keys]
        print(table(title, header, [[f"{r['restored']:,}", *figures, str(r["log_lines"])]]))

        r = await sweep_over_http(args.src, workdir)
        results["sweep_http"] = r
        title = f"Sweep of {SWEEP_FLEET:,} expiring workers seen by a client (ms)"
        header = ["quiet max", "expiry p99", "expiry max", "requests", "log lines"]
        keys = ["quiet_max_ms", "expiry_p99_ms", "expiry_max_ms"]
        figures = [f"{r[k]:.2f}" for k in keys] + [str(r["requests"]), str(r["log_lines"])]
        print(table(title, header, [figures]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls; HTTP: least_time only")
    parser.add_argument("--src", help="import controller from this directory")
    parser.add_argument("--json", help="write the figures to this file as well")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    import uvloop

    results = uvloop.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
