"""The floor for ``/get_worker_address``: a bare aiohttp app that parses the JSON body and
answers a fixed address.

It does what any aiohttp handler of that endpoint must do and nothing more: uvloop, the
access log off as fc-controller has it, the body read and decoded with ``json.loads``, a
JSON answer encoded once at start-up. No validation, no registry, no logging. run.py
measures it next to fc-controller in the dispatch scenario; the target is fc-controller's
CPU per request at most 1.1 times this app's.

Run with the benchmark venv's Python (aiohttp + uvloop). ``GET /test_connection`` answers
``"success"`` like a controller's, so run.py can tell when it is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import uvloop
from aiohttp import web
from bench_worker import until_signalled

ANSWER_KEY = web.AppKey("answer", bytes)


async def get_worker_address(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(body=request.app[ANSWER_KEY], content_type="application/json")


async def test_connection(request: web.Request) -> web.Response:
    return web.Response(body=b'"success"', content_type="application/json")


def make_app(address: str) -> web.Application:
    # The same application and runner settings as fc-controller's (controller/server.py).
    app = web.Application(handler_args={"access_log": None})
    app[ANSWER_KEY] = json.dumps({"address": address}).encode()
    app.add_routes(
        [
            web.post("/get_worker_address", get_worker_address),
            web.get("/test_connection", test_connection, allow_head=False),
        ]
    )
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args.address), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port, reuse_address=True).start()
        await until_signalled()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--address",
        default="http://127.0.0.1:1/w",
        help="the worker address every request is answered with",
    )
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
