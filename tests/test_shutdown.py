"""Graceful shutdown: streams in flight drain, the rest end with the in-band error."""

from __future__ import annotations

import asyncio

import aiohttp

from controller import Controller, ControllerConfig

from .conftest import MakeWorker, register_body, split_stream


async def test_stream_in_flight_finishes_during_drain(
    make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A stream that ends within the drain timeout reaches its client whole despite aclose()."""
    worker = await make_worker(tokens=3, hang_after=1)
    controller = await Controller.serve(ControllerConfig(host="127.0.0.1", port=0))
    async with http.post(f"{controller.url}/register_worker", json=register_body(worker)):
        pass
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        first = await r.content.readuntil(b"\0")
        closing = asyncio.create_task(controller.aclose())
        # The controller is closing while the worker still holds the stream: finish it now.
        worker.release.set()
        rest = await r.read()
    await asyncio.wait_for(closing, 5)

    assert [m["error_code"] for m in split_stream(first + rest)] == [0, 0, 0]


async def test_stream_outliving_drain_ends_with_in_band_error(
    make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A stream still running at the drain timeout ends with the 50006 message, not a cut."""
    worker = await make_worker(tokens=3, hang_after=1)
    controller = await Controller.serve(
        ControllerConfig(host="127.0.0.1", port=0, drain_timeout=0.2)
    )
    async with http.post(f"{controller.url}/register_worker", json=register_body(worker)):
        pass
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        first = await r.content.readuntil(b"\0")
        closing = asyncio.create_task(controller.aclose())
        rest = await asyncio.wait_for(r.read(), 5)
    await asyncio.wait_for(closing, 5)

    assert [m["error_code"] for m in split_stream(first + rest)] == [0, 50006]
    assert rest.endswith(b"\0")
