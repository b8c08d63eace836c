"""A first end-to-end pass: register a fake worker, stream through the controller."""

from __future__ import annotations

import aiohttp

from .conftest import MakeWorker, RunController, register_body, split_stream


async def test_stream_through_controller(
    make_worker: MakeWorker, run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A registered worker's stream reaches the client message by message, NUL after each."""
    worker = await make_worker(tokens=4, split=True)
    controller = await run_controller()
    async with http.post(f"{controller.url}/register_worker", json=register_body(worker)) as r:
        assert r.status == 200
        assert await r.json() is None
    async with http.post(
        f"{controller.url}/worker_generate_stream", json={"model": "m", "prompt": "hi"}
    ) as r:
        raw = await r.read()
    assert raw.endswith(b"\0")
    assert [m["text"] for m in split_stream(raw)] == [
        "tok0",
        "tok0 tok1",
        "tok0 tok1 tok2",
        "tok0 tok1 tok2 tok3",
    ]
