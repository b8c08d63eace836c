"""In-flight accounting is right on every path: thousands of mixed outcomes leave no residue."""

from __future__ import annotations

import asyncio
import collections
import os
import random
from typing import Any

import aiohttp
import attrs

from controller import Controller, ControllerConfig

from .conftest import FakeWorker, MakeWorker, register_body, split_stream, wait_until

REQUESTS = 2000
CONCURRENCY = 50
API_TIMEOUT = 0.25
REPORTED = (0, 1, 3, 0)

#: how often each kind of request is drawn
KINDS = {
    "ok": 40,
    "worker_500": 5,
    "drop_at_once": 5,
    "die": 8,
    "hang_mid_stream": 3,
    "hang_first_byte": 2,
    "hold_headers": 2,
    "client_leaves": 8,
    "client_cancels": 8,
    "no_worker": 4,
    "single_call": 5,
}


@attrs.frozen
class Plan:
    kind: str
    fake: dict[str, Any]
    #: for client_cancels: how long the client waits before cancelling (load, not sync)
    cancel_after: float = 0.0


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    kinds, weights = zip(*KINDS.items(), strict=True)
    for kind in rng.choices(kinds, weights, k=REQUESTS):
        fake: dict[str, Any] = {}
        cancel_after = 0.0
        if kind == "ok":
            fake = {"tokens": rng.randint(1, 4), "token_delay": rng.choice([0.0, 0.001])}
        elif kind == "worker_500":
            fake = {"stream_status": 500}
        elif kind == "drop_at_once":
            fake = {"drop_at_once": True}
        elif kind == "die":
            fake = {"tokens": 3, "die_after": rng.randint(0, 2)}
        elif kind == "hang_mid_stream":
            fake = {"tokens": 3, "hang_after": rng.randint(1, 2)}
        elif kind == "hang_first_byte":
            fake = {"hang_after": 0}
        elif kind == "hold_headers":
            fake = {"hold_headers": True}
        elif kind == "client_leaves":
            fake = rng.choice(
                [{"tokens": 3, "hang_after": 1}, {"tokens": 1000, "token_delay": 0.002}]
            )
        elif kind == "client_cancels":
            fake = rng.choice(
                [
                    {"tokens": 3, "token_delay": 0.005},
                    {"hold_headers": True},
                    {"tokens": 3, "hang_after": rng.randint(0, 2)},
                ]
            )
            cancel_after = rng.uniform(0.0, 0.03)
        plans.append(Plan(kind, fake, cancel_after))
    return plans


def expected_codes(plan: Plan) -> list[int] | None:
    """The error codes the client must see, or ``None`` when the outcome is not fixed."""
    fake = plan.fake
    if plan.kind == "ok":
        return [0] * fake["tokens"]
    if plan.kind in ("worker_500", "drop_at_once", "hang_first_byte", "hold_headers"):
        return [50006]
    if plan.kind == "die":
        return [0] * fake["die_after"] + [50006] if fake["die_after"] else [50006]
    if plan.kind == "hang_mid_stream":
        return [0] * fake["hang_after"] + [50006]
    if plan.kind == "no_worker":
        return [50005]
    return None


@attrs.define
class Tally:
    outcomes: collections.Counter[str] = attrs.Factory(collections.Counter)
    mismatches: list[str] = attrs.Factory(list)


async def run_one(
    http: aiohttp.ClientSession, controller: Controller, plan: Plan, tally: Tally
) -> None:
    url = controller.url
    body: dict[str, Any] = {"model": "nope" if plan.kind == "no_worker" else "m", "fake": plan.fake}
    if plan.kind == "single_call":
        # The fake workers have no /worker_generate: an HTTP 404 from each one tried.
        async with http.post(f"{url}/worker_generate", json=body) as r:
            answer = await r.json()
        if r.status != 200 or answer.get("error_code") != 50006:
            tally.mismatches.append(f"single call: HTTP {r.status} {answer}")
    elif plan.kind == "client_leaves":
        async with http.post(f"{url}/worker_generate_stream", json=body) as r:
            await r.content.readuntil(b"\0")
            r.close()
    elif plan.kind == "client_cancels":
        task = asyncio.create_task(stream(http, url, body))
        await asyncio.sleep(plan.cancel_after)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    else:
        codes = [m["error_code"] for m in await stream(http, url, body)]
        if codes != expected_codes(plan):
            tally.mismatches.append(f"{plan}: got {codes}")
    tally.outcomes[plan.kind] += 1


async def stream(http: aiohttp.ClientSession, url: str, body: Any) -> list[dict[str, Any]]:
    async with http.post(f"{url}/worker_generate_stream", json=body) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.endswith(b"\0")
    return split_stream(raw)


def residue(
    controller: Controller, workers: list[FakeWorker]
) -> dict[str, tuple[int, int, int, int]]:
    """Per worker that is off: (queue length, reported, streams relayed, streams at worker)."""
    off = {}
    for worker, reported in zip(workers, REPORTED, strict=True):
        info = controller.registry.get(worker.url)
        assert info is not None
        if info.queue_length != reported or info.load.active_streams or worker.active:
            off[worker.url] = (info.queue_length, reported, info.load.active_streams, worker.active)
    return off


async def settled(controller: Controller, workers: list[FakeWorker]) -> None:
    """Wait (bounded) until no worker has anything left in flight; fail naming the residue."""
    try:
        await wait_until(lambda: not residue(controller, workers), timeout=3)
    except TimeoutError:
        raise AssertionError(f"in-flight residue: {residue(controller, workers)}") from None


async def test_in_flight_counts_return_to_reported_after_mixed_outcomes(
    make_worker: MakeWorker,
) -> None:
    """2,000 mixed relays and a shutdown leave every worker's count at what it reported."""
    seed = int(os.environ.get("FC_RELIABILITY_SEED", random.randrange(2**32)))
    print(f"\nFC_RELIABILITY_SEED={seed}")
    rng = random.Random(seed)
    plans = make_plans(rng)
    workers = [await make_worker(queue_length=q) for q in REPORTED]
    # No load polls: a poll would overwrite the counts with the workers' reports and hide
    # any leak.
    config = ControllerConfig(
        host="127.0.0.1",
        port=0,
        worker_api_timeout=API_TIMEOUT,
        drain_timeout=0.05,
        load_poll_interval=0,
    )
    controller = await Controller.serve(config, rng=random.Random(seed))
    tally = Tally()
    try:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
        async with aiohttp.ClientSession(connector=connector) as http:
            for worker in workers:
                async with http.post(
                    f"{controller.url}/register_worker", json=register_body(worker)
                ) as r:
                    assert r.status == 200
            limit = asyncio.Semaphore(CONCURRENCY)

            async def bounded(plan: Plan) -> None:
                async with limit:
                    await run_one(http, controller, plan, tally)

            async with asyncio.timeout(30):
                await asyncio.gather(*(bounded(plan) for plan in plans))
            assert tally.mismatches == [], f"seed {seed}"
            await settled(controller, workers)

            # Shutdown with streams in flight: they outlive the drain and are ended.
            body = {"model": "m", "fake": {"tokens": 3, "hang_after": 1}}
            responses = [
                await http.post(f"{controller.url}/worker_generate_stream", json=body)
                for _ in range(10)
            ]
            for r in responses:
                await r.content.readuntil(b"\0")
            await controller.aclose()
            for r in responses:
                assert split_stream(await r.read())[-1]["error_code"] == 50006
                r.release()
            await settled(controller, workers)
    finally:
        await controller.aclose()
    print(f"outcomes: {dict(sorted(tally.outcomes.items()))}")
    assert sum(tally.outcomes.values()) == REQUESTS
