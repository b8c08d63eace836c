"""The hostile scenario's misbehaving workers: one aiohttp + uvloop process, one port, one
worker per path prefix (a worker's name is its base URL, so ``http://127.0.0.1:P/huge`` is a
worker whose endpoints are ``/huge/worker_generate`` and so on).

- ``/huge``: ``/worker_generate`` answers 256 MiB of JSON string, chunked, 1 MiB at a time,
  until the controller stops reading.
- ``/million``: ``/worker_get_status`` answers a million model names (about 11 MB).
- ``/fleet/w{i}``: ``/worker_get_status`` answers a plain status serving ``hostile-fleet``;
  the probes are counted per worker.
- ``GET /counts``: what each worker was asked, as JSON.

Run with the benchmark venv's Python. Prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter

import uvloop
from aiohttp import web
from bench_worker import until_signalled

MIB = 1 << 20
HUGE_ANSWER = 256 * MIB
MILLION = 1_000_000
FLEET_MODEL = "hostile-fleet"


class Workers:
    """The workers' state: the prebuilt answers and the counters."""

    def __init__(self) -> None:
        names = [f"m{i}" for i in range(MILLION)]
        self.million = json.dumps({"model_names": names, "speed": 1, "queue_length": 0}).encode()
        self.fleet_status = json.dumps(
            {"model_names": [FLEET_MODEL], "speed": 1, "queue_length": 0}
        ).encode()
        self.counts: Counter[str] = Counter()
        self.fleet_probes: Counter[int] = Counter()

    async def huge(self, request: web.Request) -> web.StreamResponse:
        self.counts["huge_started"] += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        chunk = b"x" * MIB
        sent = 0
        try:
            await response.prepare(request)
            await response.write(b'{"text": "')
            while sent < HUGE_ANSWER:
                await response.write(chunk)
                sent += len(chunk)
            await response.write(b'", "error_code": 0}')
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            # aiohttp cancels the handler when the client (the controller) goes away.
            self.counts["huge_cut_off"] += 1
            self.counts["huge_mib_sent"] += sent // MIB
            raise
        self.counts["huge_finished"] += 1
        return response

    async def million_status(self, request: web.Request) -> web.StreamResponse:
        self.counts["million_probes"] += 1
        return web.Response(body=self.million, content_type="application/json")

    async def fleet(self, request: web.Request) -> web.StreamResponse:
        self.fleet_probes[int(request.match_info["i"])] += 1
        return web.Response(body=self.fleet_status, content_type="application/json")

    async def report(self, request: web.Request) -> web.StreamResponse:
        probes = self.fleet_probes
        return web.json_response(
            {
                **self.counts,
                "fleet_probes": sum(probes.values()),
                "fleet_workers_probed": len(probes),
                "fleet_most_probes_of_one": max(probes.values(), default=0),
            }
        )


def make_app() -> web.Application:
    workers = Workers()
    app = web.Application()
    app.router.add_post("/huge/worker_generate", workers.huge)
    app.router.add_post("/million/worker_get_status", workers.million_status)
    app.router.add_post("/fleet/w{i:[0-9]+}/worker_get_status", workers.fleet)
    app.router.add_get("/counts", workers.report)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
        print("ready", flush=True)
        await until_signalled()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
