"""FastChat's OpenAI API server against a load balancer in front of two fc-controller
replicas sharing one Redis (issue 18).

nginx (configured by ``examples/nginx/fc-controller-replicas.conf``) is the API server's
controller address and the FastChat-code worker's: the API server asks it for a worker
address and streams from the worker itself. One replica is killed with SIGKILL while
clients send chat completions: only the look-ups in flight at the killed replica may fail,
each answered by the API server as an error (no hang), and every later request succeeds.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from ..conftest import wait_until
from ..redis_support import RedisServer, redis_server, run_nginx
from .support import FAKE_REPLY, MODEL, Launcher, post_json, worker_address

__all__ = ["redis_server"]

pytestmark = pytest.mark.slow

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}


async def test_the_api_server_through_nginx_survives_a_replica_killed_mid_load(
    redis_server: RedisServer,
    launcher: Launcher,
    http: aiohttp.ClientSession,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    args = ("--registry", redis_server.url)
    a = launcher.controller("fc", args=args)
    b = launcher.controller("fc", args=args)
    replicas = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    async with run_nginx(tmp_path_factory.mktemp("nginx"), replicas) as balancer:
        launcher.worker(balancer, token_delay=0.01)

        async def both_know() -> bool:
            return all([await worker_address(http, r.url, MODEL) != "" for r in (a, b)])

        await wait_until(both_know, 10)
        api = launcher.api_server(balancer)
        killed = asyncio.Event()
        outcomes: list[tuple[bool, int, str]] = []

        async def client() -> None:
            for _ in range(25):
                after = killed.is_set()
                status, body = await post_json(
                    http, f"{api.url}/v1/chat/completions", CHAT, timeout=30
                )
                text = (
                    body["choices"][0]["message"]["content"] if status == 200 else json.dumps(body)
                )
                outcomes.append((after, status, text))

        clients = [asyncio.create_task(client()) for _ in range(6)]
        await wait_until(lambda: len(outcomes) >= 24, 60)
        a.service.kill()
        killed.set()
        await asyncio.gather(*clients)
    assert len(outcomes) == 150
    after = [(status, text) for late, status, text in outcomes if late]
    before = [(status, text) for late, status, text in outcomes if not late]
    assert after == [(200, FAKE_REPLY)] * len(after)
    failed = [o for o in before if o != (200, FAKE_REPLY)]
    # At most one look-up per client was in flight at the killed replica.
    assert len(failed) <= 6, failed
    assert all(status != 200 for status, _ in failed), failed
