"""A real ``redis-server`` for the shared-registry tests: on a free loopback port, with
persistence off, stopped (and restartable) by the test.

Without ``redis-server`` on the PATH the tests that need it skip, saying so, unless
``FC_REDIS_TESTS_REQUIRED=1`` (set by ``.ci/run``, which installs Debian's package), when
they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import redis.asyncio as aioredis

REDIS_SERVER = shutil.which("redis-server")
REQUIRED = os.environ.get("FC_REDIS_TESTS_REQUIRED") == "1"


def need_redis_server() -> str:
    """The path of ``redis-server``, or skip (fail when required) saying why."""
    if REDIS_SERVER is None:
        reason = (
            "redis-server is not installed (Debian: apt-get install redis-server); "
            "the shared-registry tests need a real one"
        )
        if REQUIRED:
            pytest.fail(reason + " and FC_REDIS_TESTS_REQUIRED=1")
        pytest.skip(reason)
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define(eq=False)
class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` keep its port."""

    binary: str
    port: int = attrs.Factory(free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = self.client()
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        if await client.ping():
                            return
                    except (OSError, aioredis.ConnectionError):
                        await asyncio.sleep(0.01)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Kill it (no persistence: everything it held is gone)."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def client(self) -> Any:
        """A client decoding answers to text (typed loosely: redis-py's methods are typed
        for its synchronous and asynchronous clients at once)."""
        return aioredis.from_url(self.url, decode_responses=True)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(need_redis_server())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
