"""A real ``redis-server`` for the shared-registry tests: on a free loopback port, with
persistence off, stopped (and restartable) by the test.

Also nginx, configured by ``examples/nginx/fc-controller-replicas.conf`` (the file
docs/deployment.md shows), in front of replicas. Without ``redis-server`` (or nginx) on the
PATH the tests that need it skip, saying so, unless ``FC_REDIS_TESTS_REQUIRED=1`` (set by
``.ci/run``, which installs Debian's packages), when they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
import redis.asyncio as aioredis

from .conftest import wait_until

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


EXAMPLE = (
    Path(__file__).resolve().parent.parent / "examples" / "nginx" / "fc-controller-replicas.conf"
)


def site_config(replicas: list[str], port: int) -> str:
    """The example, pointed at ``replicas`` (``host:port``) and listening on ``port``."""
    text = EXAMPLE.read_text()
    servers = re.findall(r"^\s*server 10\.0\.0\.\d+:21001 (.*);$", text, re.MULTILINE)
    assert len(servers) == 2, "the example names two replicas"
    text = re.sub(r"^\s*server 10\.0\.0\.12:21001 .*\n", "", text, flags=re.MULTILINE)
    lines = "".join(f"    server {r} {servers[0]};\n" for r in replicas)
    text = re.sub(r"^\s*server 10\.0\.0\.11:21001 .*\n", lines, text, flags=re.MULTILINE)
    return text.replace("listen 21001;", f"listen 127.0.0.1:{port};")


@contextlib.asynccontextmanager
async def run_nginx(tmp: Path, replicas: list[str]) -> AsyncIterator[str]:
    """nginx with the example's configuration in front of ``replicas``; its base URL."""
    # Debian installs it in /usr/sbin, which a user's PATH may lack.
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        reason = "nginx is not installed (Debian: apt-get install nginx-light)"
        if REQUIRED:
            pytest.fail(reason + " and FC_REDIS_TESTS_REQUIRED=1")
        pytest.skip(reason)
    port = free_port()
    (tmp / "site.conf").write_text(site_config(replicas, port))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n"
        f"  proxy_temp_path {tmp}/proxy;\n  include {tmp}/site.conf;\n}}\n"
    )
    process = await asyncio.create_subprocess_exec(
        binary,
        "-p",
        str(tmp),
        "-e",
        str(tmp / "error.log"),
        "-c",
        str(tmp / "nginx.conf"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def listening() -> bool:
                try:
                    async with http.post(base + "/list_models") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(listening, 10)
        yield base
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 10)
