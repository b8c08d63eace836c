"""Replicas sharing one registry in Redis (issue 18): real ``redis-server`` processes and
real controller processes (``python -m controller --registry redis://...``).

Waits are on conditions seen over HTTP, never fixed sleeps; where the issue's requirement
is itself a time (a worker whose heartbeats stop is dropped everywhere within the
expiration and a second), the wait is bounded generously and the figure itself is
measured by ``benchmarks/replicas.py``.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web

from .conftest import (
    ControllerProcess,
    FakeWorker,
    MakeWorker,
    SpawnController,
    split_stream,
    wait_until,
)
from .redis_support import RedisServer, redis_server

__all__ = ["redis_server"]

pytestmark = pytest.mark.slow

EXPIRATION = "3"


def status(models: list[str] | None = None, queue: int = 0) -> dict[str, Any]:
    return {"model_names": models or ["m"], "speed": 1, "queue_length": queue}


async def post(
    http: aiohttp.ClientSession, base: str, path: str, body: Any, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(base + path, json=body, headers=headers) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def address(http: aiohttp.ClientSession, base: str, model: str = "m") -> str:
    code, answer = await post(http, base, "/get_worker_address", {"model": model})
    assert code == 200, answer
    found: str = answer["address"]
    return found


async def replicas(
    spawn: SpawnController, redis: RedisServer, n: int = 2, *extra: str
) -> list[ControllerProcess]:
    args = ("--registry", redis.url, "--heart-beat-expiration", EXPIRATION, *extra)
    return list(await asyncio.gather(*(spawn(*args) for _ in range(n))))


async def test_register_heartbeat_unregister_are_seen_at_the_other_replica(
    redis_server: RedisServer, spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    a, b = await replicas(spawn_controller, redis_server)
    name = "http://127.0.0.1:9"
    body = {"worker_name": name, "check_heart_beat": True, "worker_status": status(["m", "n"])}
    assert (await post(http, a.url, "/register_worker", body))[0] == 200

    async def b_serves() -> bool:
        return await address(http, b.url, "n") == name

    await wait_until(b_serves, 5)
    # A heartbeat sent to B is known to B (exist: true) and renews the worker at A too.
    code, answer = await post(
        http, b.url, "/receive_heart_beat", {"worker_name": name, "queue_length": 2}
    )
    assert (code, answer) == (200, {"exist": True})
    code, answer = await post(http, b.url, "/unregister_worker", {"worker_name": name})
    assert code == 200, answer

    async def a_forgot() -> bool:
        return await address(http, a.url, "n") == ""

    await wait_until(a_forgot, 5)


async def test_heartbeats_at_one_replica_keep_a_worker_alive_at_the_other_and_silence_drops_it(
    redis_server: RedisServer, spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    a, b = await replicas(spawn_controller, redis_server)
    name = "http://127.0.0.1:10"
    body = {"worker_name": name, "check_heart_beat": True, "worker_status": status()}
    assert (await post(http, a.url, "/register_worker", body))[0] == 200

    async def b_serves() -> bool:
        return await address(http, b.url) == name

    await wait_until(b_serves, 5)
    # Heartbeats go to B only, for twice the expiration: A keeps the worker all along.
    loop = asyncio.get_running_loop()
    until = loop.time() + 2 * float(EXPIRATION)
    beat = {"worker_name": name, "queue_length": 0}
    while loop.time() < until:
        assert (await post(http, b.url, "/receive_heart_beat", beat)) == (200, {"exist": True})
        assert await address(http, a.url) == name
        await asyncio.sleep(0.5)  # the worker's heartbeat interval, not a synchronisation

    async def both_dropped() -> bool:
        return await address(http, a.url) == "" and await address(http, b.url) == ""

    # Heartbeats stopped: gone everywhere (expiration + 1 s; the bound here is generous
    # for a loaded machine, benchmarks/replicas.py measures it).
    await wait_until(both_dropped, float(EXPIRATION) + 5)


async def test_sigkill_of_one_replica_does_not_disturb_streams_through_the_other(
    redis_server: RedisServer,
    spawn_controller: SpawnController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
) -> None:
    a, b = await replicas(spawn_controller, redis_server)
    worker = await make_worker(tokens=20, token_delay=0.01)
    body = {"worker_name": worker.url, "check_heart_beat": False, "worker_status": status()}
    assert (await post(http, a.url, "/register_worker", body))[0] == 200

    async def b_serves() -> bool:
        return await address(http, b.url) == worker.url

    await wait_until(b_serves, 5)

    async def one_stream() -> list[dict[str, Any]]:
        async with http.post(f"{b.url}/worker_generate_stream", json={"model": "m"}) as r:
            assert r.status == 200
            return split_stream(await r.read())

    async def client(results: list[list[dict[str, Any]]]) -> None:
        for _ in range(10):
            results.append(await one_stream())

    results: list[list[dict[str, Any]]] = []
    clients = [asyncio.create_task(client(results)) for _ in range(8)]
    await wait_until(lambda: len(results) >= 8, 10)
    a.signal(signal.SIGKILL)
    await a.wait(10)
    await asyncio.gather(*clients)
    assert len(results) == 80
    for messages in results:
        assert [m["error_code"] for m in messages] == [0] * 20


async def test_redis_restart_under_dispatch_load_loses_nothing(
    redis_server: RedisServer, spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    """Redis restarts without persistence while clients ask both replicas for workers: no
    empty answer for a registered model, and within one heartbeat interval of Redis
    answering every replica knows every live worker, one registered meanwhile too."""
    a, b = await replicas(spawn_controller, redis_server)
    names = ["http://127.0.0.1:11", "http://127.0.0.1:12"]
    for name, replica in zip(names, (a, b), strict=True):
        body = {"worker_name": name, "check_heart_beat": True, "worker_status": own(name)}
        assert (await post(http, replica.url, "/register_worker", body))[0] == 200
    interval = 0.5
    stop = asyncio.Event()

    async def heartbeats(name: str, replica: ControllerProcess) -> None:
        while not stop.is_set():
            beat = {"worker_name": name, "queue_length": 0}
            _, answer = await post(http, replica.url, "/receive_heart_beat", beat)
            if answer == {"exist": False}:  # as a FastChat worker does: register again
                body = {"worker_name": name, "check_heart_beat": True, "worker_status": own(name)}
                await post(http, replica.url, "/register_worker", body)
            await asyncio.sleep(interval)

    answers: list[str] = []

    async def clients() -> None:
        while not stop.is_set():
            for replica in (a, b):
                answers.append(await address(http, replica.url))

    async def both_know(*wanted: str) -> bool:
        for replica in (a, b):
            for name in wanted:
                if await address(http, replica.url, name) != name:
                    return False
        return True

    await wait_until(lambda: both_know(*names), 5)
    tasks = [
        asyncio.create_task(heartbeats(names[0], a)),
        asyncio.create_task(heartbeats(names[1], b)),
        asyncio.create_task(clients()),
    ]
    await wait_until(lambda: len(answers) > 50, 10)
    await redis_server.stop()
    # Meanwhile a worker registers at A alone.
    late = "http://127.0.0.1:13"
    body = {"worker_name": late, "check_heart_beat": True, "worker_status": own(late)}
    assert (await post(http, a.url, "/register_worker", body))[0] == 200
    tasks.append(asyncio.create_task(heartbeats(late, a)))
    served = len(answers)
    await wait_until(lambda: len(answers) > served + 50, 10)
    await redis_server.start()
    # Convergence within one heartbeat interval (plus the replicas' reconnect attempts,
    # every 0.5 s, and slack for a loaded machine).
    await wait_until(lambda: both_know(*names, late), 5 * interval + 3)
    stop.set()
    await asyncio.gather(*tasks)
    assert "" not in answers
    redis = redis_server.client()
    try:
        keys = await redis.keys("fc-controller:worker:*")
    finally:
        await redis.aclose()
    assert {k.rpartition(":worker:")[2] for k in keys} >= {*names, late}


def own(name: str) -> dict[str, Any]:
    """A status serving ``m`` and a model named after the worker (to find it by)."""
    return status(["m", name])


async def connected(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(base + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("fc_controller_registry_connected "):
                return float(line.split()[1])
    raise AssertionError("no fc_controller_registry_connected in /metrics")


async def test_redis_down_for_a_while_and_back(
    redis_server: RedisServer, spawn_controller: SpawnController, http: aiohttp.ClientSession
) -> None:
    """While Redis is away each replica serves alone, takes registrations, unregistrations
    and heartbeats, and expires nothing on heartbeat age; back, what changed is written
    back, an entry unregistered meanwhile is not brought back, and each says so once."""
    a, b = await replicas(spawn_controller, redis_server)
    kept, leaving, beating = "http://127.0.0.1:21", "http://127.0.0.1:22", "http://127.0.0.1:23"
    for name, check in ((kept, False), (leaving, False), (beating, True)):
        body = {"worker_name": name, "check_heart_beat": check, "worker_status": own(name)}
        assert (await post(http, a.url, "/register_worker", body))[0] == 200

    async def b_knows(name: str) -> bool:
        return await address(http, b.url, name) == name

    for name in (kept, leaving, beating):
        await wait_until(lambda name=name: b_knows(name), 5)
    assert await connected(http, a.url) == 1

    await redis_server.stop()

    async def both_alone() -> bool:
        return await connected(http, a.url) == 0 and await connected(http, b.url) == 0

    await wait_until(both_alone, 10)
    # Alone: a registration at A, an unregistration at B, heartbeats to B only.
    new = "http://127.0.0.1:24"
    body = {"worker_name": new, "check_heart_beat": True, "worker_status": own(new)}
    assert (await post(http, a.url, "/register_worker", body))[0] == 200
    assert await address(http, a.url, new) == new
    assert await address(http, b.url, new) == ""
    assert (await post(http, b.url, "/unregister_worker", {"worker_name": leaving}))[0] == 200
    assert await address(http, b.url, leaving) == ""
    assert await address(http, a.url, leaving) == leaving
    loop = asyncio.get_running_loop()
    until = loop.time() + 2 * float(EXPIRATION)
    while loop.time() < until:
        beat = {"worker_name": beating, "queue_length": 0}
        assert await post(http, b.url, "/receive_heart_beat", beat) == (200, {"exist": True})
        beat = {"worker_name": new, "queue_length": 0}
        assert await post(http, a.url, "/receive_heart_beat", beat) == (200, {"exist": True})
        # A hears nothing of `beating` for twice the expiration, and keeps it.
        assert await address(http, a.url, beating) == beating
        assert await address(http, a.url) != ""
        await asyncio.sleep(0.5)  # the workers' heartbeat interval

    await redis_server.start()

    async def converged() -> bool:
        return (
            await address(http, b.url, new) == new
            and await address(http, a.url, leaving) == ""
            and await address(http, a.url, kept) == kept
            and await address(http, b.url, kept) == kept
        )

    await wait_until(converged, 10)
    assert await connected(http, a.url) == 1
    # The unregistration stays: every replica merged, and nothing brought it back.
    redis = redis_server.client()
    try:
        stored = await redis.hgetall("fc-controller:worker:" + leaving)
    finally:
        await redis.aclose()
    assert stored == {} or stored["x"] == "1"
    assert await address(http, b.url, leaving) == ""
    for replica in (a, b):
        warnings = [line for line in replica.lines if "unreachable" in line]
        assert len(warnings) == 1, warnings
        assert "WARNING" in warnings[0]
        assert len([line for line in replica.lines if "answers again" in line]) == 1


@attrs.define(eq=False)
class SlotWorker(FakeWorker):
    """A worker that reports the streams it holds as its queue, and counts its peak."""

    peak: int = 0

    def status(self) -> dict[str, Any]:
        return {"model_names": self.model_names, "speed": 1, "queue_length": self.active}

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        self.peak = max(self.peak, self.active + 1)
        return await super().handle_stream(request)


async def estimates(http: aiohttp.ClientSession, base: str, model: str) -> dict[str, int]:
    """The replica's queue estimate per worker of ``model``, as its dispatch sees it (a
    ``/model_details`` call is relayed without counting as work)."""
    assert (await post(http, base, "/model_details", {"model": model}))[0] == 200
    async with http.get(f"{base}/dispatch_decisions", params={"n": "1"}) as r:
        (decision,) = (await r.json())["decisions"]
    return {c["worker"]: c["queue_length"] for c in decision["candidates"]}


@pytest.mark.parametrize("lopsided", [False, True], ids=["same-model", "lopsided"])
async def test_two_replicas_spread_32_streams_over_four_4_slot_workers(
    redis_server: RedisServer,
    spawn_controller: SpawnController,
    http: aiohttp.ClientSession,
    lopsided: bool,
) -> None:
    """16 streams through each replica; lopsided, A's ask for a model only two of the
    workers serve, B's for one all four serve: B must see A's streams on those two."""
    # No load polls and no heartbeats: the replicas' published in-flight counts are all B
    # has to learn of A's streams from (with polls, the shared reports tell it too).
    a, b = await replicas(
        spawn_controller, redis_server, 2, "--worker-slots", "4", "--load-poll-interval", "0"
    )
    workers = [SlotWorker(tokens=150, token_delay=0.02) for _ in range(4)]
    try:
        for i, worker in enumerate(workers):
            worker.model_names = ["all", "two"] if i < 2 else ["all"]
            await worker.start()
            body = {"worker_name": worker.url, "check_heart_beat": False}
            assert (await post(http, a.url, "/register_worker", body))[0] == 200

        async def b_has_all() -> bool:
            return len(await estimates(http, b.url, "all")) == 4

        await wait_until(b_has_all, 5)

        async def streams(base: str, model: str, n: int) -> list[list[dict[str, Any]]]:
            async def one() -> list[dict[str, Any]]:
                async with http.post(f"{base}/worker_generate_stream", json={"model": model}) as r:
                    assert r.status == 200
                    return split_stream(await r.read())

            return list(await asyncio.gather(*(one() for _ in range(n))))

        first = asyncio.create_task(streams(a.url, "two" if lopsided else "all", 16))
        await wait_until(lambda: sum(w.active for w in workers) == 16, 10)

        async def b_sees_them() -> bool:
            return sum((await estimates(http, b.url, "all")).values()) >= 12

        await wait_until(b_sees_them, 5)
        second = await streams(b.url, "all", 16)
        done = [*await first, *second]
    finally:
        for worker in workers:
            await worker.close()
    assert all(len(messages) == 150 for messages in done)
    peaks = [w.peak for w in workers]
    assert max(peaks) <= 10, peaks


async def test_ownership_holds_across_replicas(
    redis_server: RedisServer,
    spawn_controller: SpawnController,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A registration made at A with gpu-a's token belongs to gpu-a at B too; what is
    stored in Redis names the principal, never the token."""
    tokens = tmp_path / "workers.tokens"
    tokens.write_text(f"gpu-a:{TOKEN_A}\ngpu-b:{TOKEN_B}\n")
    a, b = await replicas(spawn_controller, redis_server, 2, "--worker-token-file", str(tokens))
    name = "http://127.0.0.1:31"
    body = {"worker_name": name, "check_heart_beat": True, "worker_status": own(name)}
    assert (await post(http, a.url, "/register_worker", body, TOKEN_A))[0] == 200

    async def b_knows() -> bool:
        return await address(http, b.url, name) == name

    await wait_until(b_knows, 5)
    beat = {"worker_name": name, "queue_length": 0}
    assert (await post(http, b.url, "/register_worker", body, TOKEN_B))[0] == 403
    assert (await post(http, b.url, "/receive_heart_beat", beat, TOKEN_B))[0] == 403
    goodbye = {"worker_name": name}
    assert (await post(http, b.url, "/unregister_worker", goodbye, TOKEN_B))[0] == 403
    assert await post(http, b.url, "/receive_heart_beat", beat, TOKEN_A) == (200, {"exist": True})
    redis = redis_server.client()
    try:
        stored = await redis.hgetall("fc-controller:worker:" + name)
    finally:
        await redis.aclose()
    assert json.loads(stored["d"])["owner"] == {"principal": "gpu-a", "host": None}
    assert TOKEN_A not in json.dumps(stored)
    assert (await post(http, b.url, "/unregister_worker", goodbye, TOKEN_A))[0] == 200

    async def a_forgot() -> bool:
        return await address(http, a.url, name) == ""

    await wait_until(a_forgot, 5)


TOKEN_A = "token-of-gpu-a-0123456789"
TOKEN_B = "token-of-gpu-b-0123456789"


async def test_the_password_never_reaches_the_log(
    redis_server: RedisServer, spawn_controller: SpawnController, tmp_path: Path
) -> None:
    """A Redis with a password: given in the URL, the log shows the URL with *** instead;
    given in --registry-password-file, the replica connects and the log never shows it."""
    redis = redis_server.client()
    try:
        await redis.config_set("requirepass", "s3cret-pass")
    finally:
        await redis.aclose()
    in_url = f"redis://:s3cret-pass@127.0.0.1:{redis_server.port}/0"
    first = await spawn_controller("--registry", in_url)
    line = await first.wait_for_line("Sharing the registry in redis://")
    assert "***@127.0.0.1" in line
    password_file = tmp_path / "redis-password"
    password_file.write_text("s3cret-pass\n")
    second = await spawn_controller(
        "--registry", redis_server.url, "--registry-password-file", str(password_file)
    )
    await second.wait_for_line("Sharing the registry in")
    for replica in (first, second):
        assert not any("s3cret" in line for line in replica.lines)
