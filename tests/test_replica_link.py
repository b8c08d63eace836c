"""The shared registry's link, in process, against a real ``redis-server``: no change
echoes between replicas, the slow resynchronisation heals what the stream missed (both
ways), and a replica that starts while Redis is away serves alone and catches up."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from controller.decisions.models import Owner, WorkerInfo
from controller.decisions.registry import Registry
from controller.sharing import redis_link
from controller.sharing.redis_link import SharedRegistry
from controller.sharing.redis_wire import STREAM, encode_data, worker_key

from .conftest import wait_until
from .redis_support import RedisServer, redis_server

__all__ = ["redis_server"]

Link = Callable[..., Awaitable[tuple[Registry, SharedRegistry]]]


def info(n: int) -> WorkerInfo:
    return WorkerInfo(f"http://10.0.0.{n}:31000", ("m",), 1.0, True)


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[Link]:
    """Replicas in this process: a registry each, linked to the test's Redis."""
    tasks: list[asyncio.Task[None]] = []

    async def make(resync_interval: float = 30.0) -> tuple[Registry, SharedRegistry]:
        registry = Registry(30.0)
        shared = SharedRegistry(registry, redis_server.url, resync_interval=resync_interval)
        tasks.append(asyncio.create_task(shared.run()))
        return registry, shared

    yield make
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_each_change_is_written_once_and_never_echoed(
    redis_server: RedisServer, link: Link
) -> None:
    a, shared_a = await link()
    b, shared_b = await link()
    await shared_a.wait_synced()
    await shared_b.wait_synced()
    a.register(info(1), 0, owner=Owner(host="10.0.0.1"))
    await wait_until(lambda: b.get(info(1).name) is not None)
    for queue in range(1, 6):  # each one seen at B before the next is made
        a.heartbeat(info(1).name, queue)
        await wait_until(lambda q=queue: b.get(info(1).name).queue_length == q)  # type: ignore[union-attr]
    b.remove(info(1).name, admin=True)
    await wait_until(lambda: a.get(info(1).name) is None)
    redis = redis_server.client()
    try:
        entries = await redis.xrange(STREAM)
    finally:
        await redis.aclose()
    # A registration, the heartbeats and a removal: each once, by the replica that made it.
    kinds = [tuple(fields["e"].split("\t")[0:3:2]) for _, fields in entries]
    assert kinds == [
        ("registered", shared_a.replica),
        *[("heartbeat", shared_a.replica)] * 5,
        ("removed", shared_b.replica),
    ]


async def test_the_resync_heals_what_the_stream_missed(
    redis_server: RedisServer, link: Link
) -> None:
    registry, shared = await link(resync_interval=0.1)
    await shared.wait_synced()
    redis = redis_server.client()
    try:
        # Another replica's worker, in Redis without a stream entry (a change missed).
        data = encode_data(info(2), 3, None, None, "")
        await redis.hset(
            worker_key(info(2).name),
            mapping={"n": info(2).name, "k": "registered", "v": "1", "d": data, "x": "0"}
            | {"b": str(int(await _now_us(redis))), "r": "elsewhere"},
        )
        await wait_until(lambda: registry.get(info(2).name) is not None)
        # A worker of ours that Redis lost: written back.
        registry.register(info(3), 0)
        await wait_until(lambda: _exists(redis, worker_key(info(3).name)))
        await redis.delete(worker_key(info(3).name))
        await wait_until(lambda: _exists(redis, worker_key(info(3).name)))
        stored = await redis.hgetall(worker_key(info(3).name))
        assert json.loads(stored["d"])["models"] == ["m"]
    finally:
        await redis.aclose()


async def test_a_replica_started_while_redis_is_away_serves_alone_and_catches_up(
    redis_server: RedisServer,
    link: Link,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(redis_link, "FIRST_SYNC_TIMEOUT", 0.2)
    await redis_server.stop()
    caplog.set_level(logging.INFO, "controller.sharing.redis_link")
    registry, shared = await link()
    await shared.wait_synced()  # gives up after FIRST_SYNC_TIMEOUT
    assert not shared.connected and registry.expiry_held
    registry.register(info(4), 0)
    assert registry.get(info(4).name) is not None
    await redis_server.start()
    await wait_until(lambda: shared.connected, 5)
    redis = redis_server.client()
    try:
        await wait_until(lambda: _exists(redis, worker_key(info(4).name)), 5)
    finally:
        await redis.aclose()
    await wait_until(lambda: not registry.expiry_held, 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def _now_us(redis: object) -> int:
    seconds, micros = await redis.time()  # type: ignore[attr-defined]
    return int(seconds) * 1_000_000 + int(micros)


async def _exists(redis: object, key: str) -> bool:
    found: int = await redis.exists(key)  # type: ignore[attr-defined]
    return found == 1
