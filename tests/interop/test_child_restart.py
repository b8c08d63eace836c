"""A child controller that crashes and comes back is served through its parent again.

The tree is FastChat-code worker -> child fc-controller -> parent fc-controller, with the
child registered at the parent by FastChat's ``register_worker`` script
(``check_heart_beat`` false, so the parent never expires it) and FastChat's API server
pointed at the parent. The child is killed with SIGKILL and started again on its port, and
the parent's load poll reaches it before its worker has registered again: it answers
``model_names: []``. The parent must keep the child's models, so that the model is served
again as soon as the worker is back, with nobody calling ``/refresh_all_workers``.

The parent runs in this process, so the test can see its poll reach the restarted child.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from controller import Controller, ControllerConfig
from controller.decisions.changes import ChangeKind, Subscription

from .support import FAKE_REPLY, MODEL, Launcher, eventually, list_models, post_json

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
#: the worker's heartbeat interval (FASTCHAT_WORKER_HEART_BEAT_INTERVAL), in seconds
HEART_BEAT_INTERVAL = 1


async def chat_works(http: aiohttp.ClientSession, api_url: str) -> bool:
    status, body = await post_json(http, f"{api_url}/v1/chat/completions", CHAT)
    return status == 200 and body["choices"][0]["message"]["content"] == FAKE_REPLY


async def poll_answered(changes: Subscription, worker_name: str) -> None:
    """Wait for the registry to take a status answer from ``worker_name``."""
    while True:
        await changes.wait()
        taken = changes.take() or []
        if any(c.info.name == worker_name for c in taken):
            return


async def test_parent_serves_a_restarted_child_once_its_worker_is_back(
    launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """After the child is killed and restarted, a chat completion through the parent
    succeeds within two heartbeat intervals of the child's worker registering again."""
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0.2)
    async with Controller.serve(config) as parent:
        # Blocking launcher calls run in a thread: the parent answers on this loop.
        child = await asyncio.to_thread(launcher.controller, "fc")
        worker = await asyncio.to_thread(
            launcher.worker, child.url, heart_beat_interval=HEART_BEAT_INTERVAL
        )
        done = await asyncio.to_thread(
            launcher.run_fastchat,
            "fastchat.serve.register_worker",
            "--controller-address",
            parent.url,
            "--worker-name",
            child.url,
        )
        assert done.returncode == 0, done.stderr
        api = await asyncio.to_thread(launcher.api_server, parent.url)
        assert await chat_works(http, api.url)

        # Hold the worker still, so the parent's poll finds the restarted child empty.
        worker.service.send_signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(launcher.restart_controller, child)
            assert await list_models(http, child.url) == []
            changes = parent.registry.feed.subscribe({ChangeKind.LOAD, ChangeKind.UPDATED})
            # A request handed out makes the child's entry due for a load poll.
            _, answer = await post_json(http, f"{parent.url}/get_worker_address", {"model": MODEL})
            assert answer == {"address": child.url}
            async with asyncio.timeout(10):
                await poll_answered(changes, child.url)
            assert await list_models(http, parent.url) == [MODEL]
        finally:
            worker.service.send_signal(signal.SIGCONT)

        # Its next heartbeat gets exist: false and it registers with the new child.
        async def worker_is_back() -> bool:
            return await list_models(http, child.url) == [MODEL]

        await eventually(worker_is_back, 20, "the worker registered with the restarted child")
        # The requirement itself: served again within two heartbeat intervals.
        await eventually(
            lambda: chat_works(http, api.url),
            2 * HEART_BEAT_INTERVAL,
            "a chat completion through the parent succeeds",
        )
