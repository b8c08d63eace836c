"""A controller registered with a parent controller as one worker (hierarchical mode)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import MakeWorker, RunController, register_body, split_stream


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_child_offers_its_models_streams_and_withdraws(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """The parent learns the child's models, streams through it, and forgets it on close."""
    parent = await run_controller()
    child = await Controller.serve(
        ControllerConfig(
            host="127.0.0.1",
            port=0,
            parent_controller=parent.url,
            parent_heart_beat_interval=0.2,
        )
    )
    child_url = child.url
    try:
        first = await make_worker(model_names=["a"], tokens=2)
        second = await make_worker(model_names=["b"], queue_length=3)
        async with http.post(f"{child.url}/register_worker", json=register_body(first)):
            pass
        await eventually(lambda: parent.registry.model_names() == ["a"])
        entry = parent.registry.get(child.url)
        assert entry is not None
        assert entry.info.check_heart_beat

        # A new model at the child reaches the parent, with the summed speed and queue.
        async with http.post(f"{child.url}/register_worker", json=register_body(second)):
            pass
        await eventually(lambda: parent.registry.model_names() == ["a", "b"])
        entry = parent.registry.get(child.url)
        assert entry is not None
        assert (entry.info.speed, entry.queue_length) == (2, 3)

        async with http.post(f"{parent.url}/worker_generate_stream", json={"model": "a"}) as r:
            messages = split_stream(await r.read())
        assert [m["text"] for m in messages] == ["tok0", "tok0 tok1"]
    finally:
        await child.aclose()

    # Withdrawn at once, not left to expire.
    assert parent.registry.get(child_url) is None
    async with http.post(f"{parent.url}/get_worker_address", json={"model": "a"}) as r:
        assert await r.json() == {"address": ""}


async def test_embedded_child_needs_an_advertise_address() -> None:
    """Embedding a child controller without saying where the parent reaches it is refused."""
    from aiohttp import web

    from controller import ConfigError

    config = ControllerConfig(parent_controller="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="advertise_address"):
        await Controller.start(web.Application(), config)
