#!/usr/bin/env python3
"""What request ids add to every request, in microseconds, measured in-process.

    .venv/bin/python benchmarks/request_id_cost.py

The route wrapper (read ``X-Request-Id``, check it or make one, set the context variable,
write it into the answer) against calling the handler directly, for a request without the
header and one with a valid one. The median of five rounds of 200,000 calls each; a loaded
machine inflates both sides alike. For instructions per whole request, which do not swing
with the machine's load, run the dispatch scenario of an instruction counter under
valgrind on both revisions; for time, ``benchmarks/compare.py BASE HEAD --scenario
dispatch``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from controller.edge.request_ids import with_request_id

CALLS = 200_000
ROUNDS = 5


async def handler(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def per_call(one: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await one()
    return (time.perf_counter() - start) / CALLS * 1e6


async def difference(
    measured: Callable[[], Awaitable[object]], base: Callable[[], Awaitable[object]]
) -> float:
    return statistics.median(
        [await per_call(measured) - await per_call(base) for _ in range(ROUNDS)]
    )


async def main() -> None:
    plain = make_mocked_request("POST", "/get_worker_address")
    given = make_mocked_request(
        "POST", "/get_worker_address", headers={"X-Request-Id": "abc-123.x"}
    )
    tagged = with_request_id(handler)
    print(f"| {'route wrapper, request with':<40} | µs per request |")
    print(f"|{'-' * 42}|---------------:|")
    for name, request in (("no X-Request-Id", plain), ("a valid X-Request-Id", given)):

        async def wrapped(request: web.Request = request) -> object:
            return await tagged(request)

        async def direct(request: web.Request = request) -> object:
            return await handler(request)

        print(f"| {name:<40} | {await difference(wrapped, direct):14.2f} |")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        import asyncio

        asyncio.run(main())
    else:
        uvloop.run(main())
