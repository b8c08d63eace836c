"""A client that leaves mid-request frees its worker at once, whatever the worker is doing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import (
    FakeClock,
    MakeWorker,
    RunController,
    queue_estimates,
    register,
    wait_until,
)

#: how long a test waits for what it expects: a bound against hanging, not a latency bound
#: (test_reliability_faults.py pins how quickly a departure reaches the worker)
PATIENCE = 5.0


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller()


async def settled(controller: Controller, name: str, expected: int) -> None:
    """Wait until the worker's queue length is back to ``expected`` with nothing relayed."""
    async with asyncio.timeout(2):
        while True:
            info = controller.registry.get(name)
            assert info is not None
            if info.queue_length == expected and info.load.active_streams == 0:
                return
            await asyncio.sleep(0.01)


async def test_client_leaving_while_worker_queues_request(
    controller: Controller, make_worker: MakeWorker
) -> None:
    """A client leaving before the worker answered at all cancels the request to the worker."""
    worker = await make_worker(hold_headers=True, queue_length=1)
    async with aiohttp.ClientSession() as http:
        await register(http, controller, worker)
        request = asyncio.create_task(
            http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"})
        )
        await asyncio.wait_for(worker.stream_started.wait(), PATIENCE)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    # The client's session (and its connection) is gone now; the worker was never released.
    await asyncio.wait_for(worker.upstream_gone.wait(), PATIENCE)
    assert worker.active == 0
    await settled(controller, worker.url, expected=1)


async def test_client_leaving_while_worker_is_silent(
    controller: Controller, make_worker: MakeWorker
) -> None:
    """A client leaving while its worker is silent mid-stream closes the worker's request."""
    worker = await make_worker(tokens=3, hang_after=1)
    async with aiohttp.ClientSession() as http:
        await register(http, controller, worker)
        response = await http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"})
        await response.content.readuntil(b"\0")
        response.close()
    # The worker was never released: only the controller can have closed its request.
    await asyncio.wait_for(worker.upstream_gone.wait(), PATIENCE)
    assert worker.active == 0
    await settled(controller, worker.url, expected=0)
    info = controller.registry.get(worker.url)
    assert info is not None
    assert not controller.registry.is_ejected(info)


async def test_client_leaving_lowers_queue_estimate_between_load_polls(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    """A client leaving mid-stream lowers the queue estimate at once, not at the next load poll."""
    # Load polling on (the default interval), but the controller's clock stands still: no
    # poll ever falls due, so only the relay's own accounting can lower the estimate.
    config = ControllerConfig(host="127.0.0.1", port=0)
    assert config.load_poll_interval > 0
    controller = await run_controller(config, clock=clock)
    worker = await make_worker(tokens=1_000_000, token_delay=0.01)
    await register(http, controller, worker)
    assert await queue_estimates(http, controller) == {worker.url: 0}

    async with aiohttp.ClientSession() as client:
        response = await client.post(
            f"{controller.url}/worker_generate_stream", json={"model": "m"}
        )
        await response.content.readuntil(b"\0")
        assert await queue_estimates(http, controller) == {worker.url: 1}
        response.close()

    # The worker was still streaming: only the controller can have closed its request.
    await asyncio.wait_for(worker.upstream_gone.wait(), PATIENCE)

    async def idle() -> bool:
        return await queue_estimates(http, controller) == {worker.url: 0}

    try:
        await wait_until(idle, timeout=PATIENCE)
    except TimeoutError:
        left = await queue_estimates(http, controller)
        raise AssertionError(f"the departed client's stream is still counted: {left}") from None
    assert worker.status_calls == 0, "a load poll ran: the test proves nothing"
