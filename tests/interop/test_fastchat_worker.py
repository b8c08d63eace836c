"""FastChat's own worker code (``BaseModelWorker`` and its app) against either controller."""

from __future__ import annotations

import aiohttp

from .support import (
    FAKE_REPLY,
    MODEL,
    Launcher,
    eventually,
    list_models,
    stream_messages,
    worker_address,
)

HEART_BEAT_INTERVAL = 1
#: after a heartbeat fails, FastChat's worker waits this long before it tries again
WORKER_RETRY_PAUSE = 5


async def test_worker_registers_and_heartbeats(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A FastChat worker registers, is listed and routed to, and its heartbeats are accepted."""
    controller = launcher.controller(kind, expiration=2)
    worker = launcher.worker(controller.url, heart_beat_interval=HEART_BEAT_INTERVAL)

    assert await list_models(http, controller.url) == [MODEL]
    assert await worker_address(http, controller.url, MODEL) == worker.url

    async def three_heartbeats() -> bool:
        return worker.heartbeats() >= 3

    # Three heartbeats span more than the 2 s expiration: each one was answered
    # ``exist: true`` (else the worker would have registered again) and kept it alive.
    await eventually(three_heartbeats, 10, "the worker has sent three heartbeats")
    assert worker.registrations() == 1
    assert await list_models(http, controller.url) == [MODEL]


async def test_worker_reregisters_after_controller_restart(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """After the controller restarts empty, the worker's next heartbeat makes it register again."""
    interval = 3
    controller = launcher.controller(kind)
    worker = launcher.worker(controller.url, heart_beat_interval=interval)
    assert await list_models(http, controller.url) == [MODEL]

    # The worker registered just before it came up, so its first heartbeat is about one
    # interval away: the restart fits in between, unless the machine is very slow.
    launcher.restart_controller(controller)

    async def listed_again() -> bool:
        return await list_models(http, controller.url) == [MODEL]

    took = await eventually(listed_again, interval + WORKER_RETRY_PAUSE + 2, "it registers again")
    bound = interval + 1
    if "heart beat error" in worker.service.fastchat_log():
        # A heartbeat reached the controller while it was down: the worker pauses before it
        # tries again (its own retry loop, whichever controller it talks to).
        bound += WORKER_RETRY_PAUSE
    assert took < bound
    assert worker.service.running
    assert worker.registrations() == 2
    assert await worker_address(http, controller.url, MODEL) == worker.url


async def test_stream_through_controller(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """The controller's /worker_generate_stream relays the worker's messages, NUL after each."""
    controller = launcher.controller(kind)
    launcher.worker(controller.url, token_delay=0.01)

    raw, messages = await stream_messages(
        http,
        f"{controller.url}/worker_generate_stream",
        {"model": MODEL, "prompt": "Say hello", "max_new_tokens": 32},
    )

    words = FAKE_REPLY.split()
    assert raw.endswith(b"\0")
    assert [m["text"] for m in messages] == [" ".join(words[:i]) for i in range(1, 6)]
    assert all(m["error_code"] == 0 for m in messages)
    assert messages[-1]["finish_reason"] == "stop"
    assert messages[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
