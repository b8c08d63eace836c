"""Open-loop Poisson clients for the dispatch-quality benchmark.

    python -m dispatch_sim.loadgen --controller URL --mode direct --rate 45 --duration 30 \
        --seed 1 --out results.json

Arrivals are a seeded Poisson process, so every dispatcher sees the same schedule. Each
request is one of:

- ``direct``, the way FastChat's OpenAI API server and Gradio work: ``POST
  /get_worker_address {"model"}`` on the controller, then stream from that worker;
- ``proxied``: ``POST /worker_generate_stream`` on the controller, which relays the stream.

Latency runs from the scheduled arrival (not the moment the request was sent, so a late
client cannot hide queueing) to the end of the stream. The file written to ``--out`` is a
JSON object with one record per request, plus how late the generator was in sending them,
so a run where the generator fell behind can be told apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp

from . import MODEL

BODY: dict[str, Any] = {
    "model": MODEL,
    "prompt": "USER: Tell me a story. ASSISTANT:",
    "temperature": 0.7,
    "top_p": 1.0,
    "max_new_tokens": 32,
    "stop": None,
    "echo": False,
}


def arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Offsets in seconds of a Poisson process of ``rate`` per second over ``duration``."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _read_stream(response: aiohttp.ClientResponse) -> tuple[dict[str, Any] | None, float]:
    """The last NUL-terminated message of a stream and when its first byte came."""
    loop = asyncio.get_running_loop()
    first: float | None = None
    buffer = b""
    last: bytes | None = None
    async for chunk in response.content.iter_any():
        if first is None:
            first = loop.time()
        buffer += chunk
        *complete, buffer = buffer.split(b"\0")
        for piece in complete:
            if piece:
                last = piece
    if buffer.strip():
        last = buffer  # an unterminated last message still tells how it ended
    message = json.loads(last) if last is not None else None
    return message, first if first is not None else loop.time()


async def one_request(
    session: aiohttp.ClientSession, controller: str, mode: str, scheduled: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    record: dict[str, Any] = {"lag": loop.time() - scheduled, "worker": None, "error": None}
    try:
        if mode == "direct":
            async with session.post(f"{controller}/get_worker_address", json={"model": MODEL}) as r:
                r.raise_for_status()
                address = (await r.json(content_type=None))["address"]
            record["dispatch"] = loop.time() - scheduled
            if not address:
                record["error"] = "no worker"
                return record
            record["worker"] = address
            url = f"{address}/worker_generate_stream"
        else:
            url = f"{controller}/worker_generate_stream"
        async with session.post(url, json=BODY) as r:
            r.raise_for_status()
            message, first = await _read_stream(r)
        record["ttfc"] = first - scheduled
        record["latency"] = loop.time() - scheduled
        if message is None:
            record["error"] = "empty stream"
        else:
            record["worker"] = record["worker"] or message.get("worker")
            if message.get("error_code", 0) != 0:
                record["error"] = f"error_code {message.get('error_code')}"
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:200]
        record["latency"] = loop.time() - scheduled
    return record


async def run(args: argparse.Namespace) -> dict[str, Any]:
    offsets = arrivals(args.rate, args.duration, args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Open a few connections before the clock starts so the first arrivals do not pay
        # for connection setup that a warm client would not.
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{args.controller}/test_connection") as r:
                await r.read()
        t0 = loop.time() + 0.2
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        for offset in offsets:
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(one_request(session, args.controller, args.mode, t0 + offset))
            )
        records = await asyncio.gather(*tasks)
    for offset, record in zip(offsets, records, strict=True):
        record["at"] = offset
    return {
        "mode": args.mode,
        "rate": args.rate,
        "duration": args.duration,
        "seed": args.seed,
        "wall": loop.time() - t0,
        "records": records,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dispatch_sim.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--controller", required=True)
    p.add_argument("--mode", choices=("direct", "proxied"), required=True)
    p.add_argument("--rate", type=float, required=True, help="arrivals per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=150.0, help="bound on one request")
    p.add_argument("--out", required=True, help="where to write the JSON results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run(args))
    with open(args.out, "w") as f:
        json.dump(result, f)
    errors = sum(1 for r in result["records"] if r["error"])
    print(f"{len(result['records'])} requests, {errors} errors", file=sys.stderr)


if __name__ == "__main__":
    main()
