"""FastChat's command-line helpers (register_worker, test_throughput) against either controller."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from .support import (
    MODEL,
    Launcher,
    consistently,
    free_port,
    list_models,
    worker_address,
)

EXPIRATION = 2


async def test_register_worker_manual_registration_never_expires(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """register_worker adds a worker that sends no heartbeats, and it outlives the expiration."""
    controller = launcher.controller(kind, expiration=EXPIRATION)
    worker = launcher.worker(controller.url, register=False)
    assert await list_models(http, controller.url) == []

    done = await asyncio.to_thread(
        launcher.run_fastchat,
        "fastchat.serve.register_worker",
        "--controller-address",
        controller.url,
        "--worker-name",
        worker.url,
    )
    assert done.returncode == 0, done.stderr

    # The controller asked the worker for its status, since the helper sends none.
    assert await list_models(http, controller.url) == [MODEL]
    assert await worker_address(http, controller.url, MODEL) == worker.url

    async def still_routed() -> bool:
        return await worker_address(http, controller.url, MODEL) == worker.url

    # Longer than the expiration, and FastChat's controller sweeps at least once meanwhile.
    await consistently(still_routed, EXPIRATION + 1, "the manually registered worker is routed to")
    assert worker.heartbeats() == 0


async def test_register_worker_that_does_not_answer(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """register_worker for an address where nothing answers succeeds but registers nothing."""
    controller = launcher.controller(kind)
    done = await asyncio.to_thread(
        launcher.run_fastchat,
        "fastchat.serve.register_worker",
        "--controller-address",
        controller.url,
        "--worker-name",
        f"http://127.0.0.1:{free_port()}",
    )
    assert done.returncode == 0, done.stderr
    assert await list_models(http, controller.url) == []


async def test_throughput_dispatch_mode(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """test_throughput --test-dispatch gets a worker per request and spreads them over both."""
    controller = launcher.controller(kind)
    # Long heartbeat intervals: no heartbeat resets the queue counts while the script runs.
    workers = [launcher.worker(controller.url, heart_beat_interval=60) for _ in range(2)]

    done = await asyncio.to_thread(
        launcher.run_fastchat,
        "fastchat.serve.test_throughput",
        "--controller-address",
        controller.url,
        "--model-name",
        MODEL,
        "--n-thread",
        "4",
        "--max-new-tokens",
        "8",
        "--test-dispatch",
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Models: ['{MODEL}']" in done.stdout
    # The threads print concurrently, so their lines may run together.
    addresses = re.findall(r"goes to (http://127\.0\.0\.1:\d+)", done.stdout)
    assert len(addresses) == 4
    assert set(addresses) == {w.url for w in workers}
    assert "n threads: 4, throughput:" in done.stdout


async def test_throughput_with_the_controller_as_worker(kind: str, launcher: Launcher) -> None:
    """test_throughput reads the second-to-last NUL piece of the controller's relayed stream."""
    controller = launcher.controller(kind)
    launcher.worker(controller.url)

    done = await asyncio.to_thread(
        launcher.run_fastchat,
        "fastchat.serve.test_throughput",
        "--worker-address",
        controller.url,
        "--model-name",
        MODEL,
        "--n-thread",
        "2",
        "--max-new-tokens",
        "8",
    )

    # A thread that could not parse its stream raises, and the script then fails summing.
    assert done.returncode == 0, done.stdout + done.stderr
    assert "n threads: 2, throughput:" in done.stdout
    assert "Traceback" not in done.stderr
