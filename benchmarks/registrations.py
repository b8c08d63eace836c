"""Registrations per second: one controller process, N workers registered with their
status over 16 kept-alive connections, as a fleet (or the hostile scenario's mass-expiry)
registers. Bounded: it registers ``--count`` names and stops.

    .venv/bin/python benchmarks/registrations.py --count 4000
    .venv/bin/python benchmarks/registrations.py --src /tmp/base   # another tree's code

Worker names are literal loopback addresses (``http://127.0.0.1:1/wN``) never contacted:
each registration carries its status, so what is measured is the controller's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


async def register_all(url: str, count: int, connections: int) -> float:
    names = iter(f"http://127.0.0.1:1/w{i}" for i in range(count))
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}

    async def client(http: aiohttp.ClientSession) -> None:
        for name in names:
            body = {"worker_name": name, "check_heart_beat": False, "worker_status": status}
            async with http.post(f"{url}/register_worker", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"registration failed: HTTP {r.status}")

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(connections)))
        return time.perf_counter() - began


def start(src: Path, python: str) -> tuple[subprocess.Popen[str], str]:
    args = ["--host", "127.0.0.1", "--port", "0", "--max-workers", "100000"]
    args += ["--max-workers-per-source", "100000", "--load-poll-interval", "0"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(
        [python, "-m", "controller", *args],
        cwd=src,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        found = re.search(r"running on (http://\S+)", line)
        if found:
            return proc, found[1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the controller did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--src", type=Path, default=ROOT, help="the tree whose code runs")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    proc, url = start(args.src, args.python)
    try:
        # The log (a line per registration) goes on to the pipe: read it, or the
        # controller blocks once the pipe is full.
        drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
        seconds = asyncio.run(register_all(url, args.count, args.connections))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        drain.wait(10)
    rate = args.count / seconds
    print(json.dumps({"count": args.count, "seconds": round(seconds, 3), "per_s": round(rate)}))


if __name__ == "__main__":
    main()
