"""A lean fake model worker for benchmarks: one process, one event loop, several ports.

Each port behaves like a FastChat model worker serving one model:

- ``POST /worker_generate_stream`` answers 200 at once, then sends N messages, one every D ms
  on a fixed schedule, each a JSON object with the cumulative ``text`` and ``error_code: 0``
  followed by NUL (the last one too). The messages are encoded once at start-up so the worker
  spends as little CPU as possible per chunk.
- ``POST /worker_get_status`` answers ``{model_names, speed: 1, queue_length}``.

A port given with ``--hang-port`` never answers ``/worker_get_status`` (the request stays open
until the client gives up): the slow worker of the slow-worker scenario.

Run with the benchmark venv's Python (aiohttp + uvloop). Prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import uvloop
from aiohttp import web

TOKENS_KEY = web.AppKey("tokens", int)
DELAY_KEY = web.AppKey("delay", float)
MESSAGES_KEY: web.AppKey[dict[int, list[bytes]]] = web.AppKey("messages")
STATUS_KEY: web.AppKey[dict[str, object]] = web.AppKey("status")
# One mutable cell: streams in progress on this port, reported as the queue length.
INFLIGHT_KEY: web.AppKey[list[int]] = web.AppKey("inflight")


def encode_messages(tokens: int) -> list[bytes]:
    """The N NUL-terminated messages of one generation, FastChat model-worker style."""
    messages: list[bytes] = []
    text = ""
    for i in range(tokens):
        text += f"tok{i} "
        last = i == tokens - 1
        message = {
            "text": text,
            "error_code": 0,
            "usage": {"prompt_tokens": 8, "completion_tokens": i + 1, "total_tokens": i + 9},
            "finish_reason": "length" if last else None,
        }
        messages.append(json.dumps(message).encode() + b"\0")
    return messages


def messages_for(app: web.Application, tokens: int) -> list[bytes]:
    cache = app[MESSAGES_KEY]
    found = cache.get(tokens)
    if found is None:
        found = cache[tokens] = encode_messages(tokens)
    return found


async def generate_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    params = await request.json()
    tokens = int(params.get("bench_tokens", app[TOKENS_KEY]))
    delay = float(params.get("bench_delay_ms", app[DELAY_KEY] * 1000)) / 1000
    messages = messages_for(app, max(1, min(tokens, 4096)))
    inflight = app[INFLIGHT_KEY]
    inflight[0] += 1
    try:
        response = web.StreamResponse()
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, message in enumerate(messages):
            wait = start + (i + 1) * delay - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await response.write(message)
            except ConnectionError:
                return response
        await response.write_eof()
        return response
    finally:
        inflight[0] -= 1


async def get_status(request: web.Request) -> web.Response:
    status = request.app[STATUS_KEY].copy()
    status["queue_length"] = request.app[INFLIGHT_KEY][0]
    return web.json_response(status)


async def hang(request: web.Request) -> web.Response:
    await asyncio.Event().wait()  # until the client leaves and aiohttp cancels us, or exit
    raise AssertionError("unreachable")


def make_app(*, model: str, tokens: int, delay: float, hanging: bool) -> web.Application:
    app = web.Application()
    app[TOKENS_KEY] = tokens
    app[DELAY_KEY] = delay
    app[MESSAGES_KEY] = {tokens: encode_messages(tokens)}
    app[STATUS_KEY] = {"model_names": [model], "speed": 1, "queue_length": 0}
    app[INFLIGHT_KEY] = [0]
    app.router.add_post("/worker_generate_stream", generate_stream)
    app.router.add_post("/worker_get_status", hang if hanging else get_status)
    return app


async def until_signalled() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(args: argparse.Namespace) -> None:
    runners: list[web.AppRunner] = []
    plan = [(port, False) for port in args.port] + [(port, True) for port in args.hang_port]
    try:
        for port, hanging in plan:
            app = make_app(
                model=args.model, tokens=args.tokens, delay=args.delay_ms / 1000, hanging=hanging
            )
            # handler_cancellation lets a hanging status request end when its client leaves.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=hanging)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, args.host, port, backlog=1024).start()
        print("ready", flush=True)
        await until_signalled()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", default=[], help="repeatable")
    parser.add_argument(
        "--hang-port", type=int, action="append", default=[], help="status never answers"
    )
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    if not args.port and not args.hang_port:
        parser.error("give at least one --port or --hang-port")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
