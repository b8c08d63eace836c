"""The hostile scenario's attacker: one attack of issue 16 against a controller, bounded in
count and time, loopback only (aiohttp + uvloop, or raw sockets).

    python benchmarks/attacks.py ATTACK --url http://127.0.0.1:P --start-at T --duration S

Each attack prepares its payload first, starts at ``--start-at`` (a ``time.monotonic()``
instant, so the orchestrator's measurement window and the attack begin together), runs for
at most about ``--duration`` seconds (the slow and idle ones hold their sockets that long;
the others end when answered), and prints one JSON object: what the attacker saw
(``seen``, a short summary for the table, and the details), when it started and ended
(monotonic seconds), and how late it started if its preparation overran. Connections are
made from ``--local-addr`` (127.0.0.3 by default), another source than the normal traffic's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import uvloop

MIB = 1 << 20
NO_MODEL = "hostile-none"  # no worker serves it: the controller decodes, then answers 50005
HUGE_MODEL = "hostile-huge"
FLEET_MODEL = "hostile-fleet"
EXPIRING_MODEL = "hostile-expiring"
JSON = {"Content-Type": "application/json"}

Attack = Callable[[argparse.Namespace, float], Awaitable[dict[str, Any]]]
Prepare = Callable[[argparse.Namespace], Any]
ATTACKS: dict[str, tuple[Prepare | None, Attack]] = {}


def attack(name: str, prepare: Prepare | None = None) -> Callable[[Attack], Attack]:
    """Register ``fn(args, started) -> details`` as attack ``name``; ``prepare(args)``
    builds its payload before the start (it becomes ``args.payload``)."""

    def register(fn: Attack) -> Attack:
        ATTACKS[name] = (prepare, fn)
        return fn

    return register


def session(
    args: argparse.Namespace, *, force_close: bool = False, source: str | None = None
) -> aiohttp.ClientSession:
    """Connections from ``source`` (default ``--local-addr``), unlimited in number."""
    connector = aiohttp.TCPConnector(
        limit=0, force_close=force_close, local_addr=(source or args.local_addr, 0)
    )
    timeout = aiohttp.ClientTimeout(total=args.duration + 20)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def outcome(request: Any) -> tuple[str, bytes]:
    """``HTTP <status>`` and the first bytes of the answer to ``request`` (what
    ``session.post(...)`` returns), or the name of the exception it raised."""
    try:
        async with request as response:
            body = await response.read()
            return f"HTTP {response.status}", body[:300]
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return type(e).__name__, b""


def tally(outcomes: Iterable[tuple[str, bytes]]) -> str:
    """``"8 x HTTP 415"``: how many of each outcome, most frequent first."""
    counts = Counter(kind for kind, _ in outcomes)
    return ", ".join(f"{n} x {kind}" for kind, n in counts.most_common())


def samples(outcomes: list[tuple[str, bytes]]) -> dict[str, str]:
    """One answer body per outcome, for the JSON."""
    seen: dict[str, str] = {}
    for kind, body in outcomes:
        seen.setdefault(kind, body.decode(errors="replace"))
    return seen


async def post_all(
    args: argparse.Namespace, path: str, bodies: list[Any], headers: dict[str, str] = JSON
) -> list[tuple[str, bytes]]:
    """POST every body at once (bytes, a file-like object or an async iterator)."""
    async with session(args, force_close=True) as http:
        url = f"{args.url}{path}"
        return list(
            await asyncio.gather(
                *(outcome(http.post(url, data=b, headers=headers)) for b in bodies)
            )
        )


def result(outcomes: list[tuple[str, bytes]], **extra: Any) -> dict[str, Any]:
    return {"seen": tally(outcomes), "answers": samples(outcomes), **extra}


# -- bodies ----------------------------------------------------------------------------------


def huge_json(args: argparse.Namespace) -> bytes:
    """63 MiB of ``{"model": ..., "junk": [{}, {}, ...]}``: millions of tiny objects."""
    head = b'{"model": "%s", "junk": [' % NO_MODEL.encode()
    count = (63 * MIB - len(head) - 2) // 4
    return head + b"{}, " * (count - 1) + b"{}]}"


@attack("huge-json", huge_json)
async def send_huge_json(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    outcomes = await post_all(args, "/worker_generate_stream", [io.BytesIO(args.payload)])
    return result(outcomes, body_bytes=len(args.payload))


def deep_bodies(args: argparse.Namespace) -> tuple[bytes, bytes]:
    """16 MiB of arrays nested 60 deep (within a 64-level limit), and one 1,000,000 deep."""
    nest = b"[" * 60 + b"]" * 60
    head = b'{"model": "%s", "junk": [' % NO_MODEL.encode()
    wide = head + b",".join([nest] * (16 * MIB // (len(nest) + 1))) + b"]}"
    deep = head + b"[" * 1_000_000 + b"]" * 1_000_000 + b"]}"
    return wide, deep


@attack("deep-nesting", deep_bodies)
async def send_deep(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    wide, deep = args.payload
    bodies = [io.BytesIO(wide), *(io.BytesIO(deep) for _ in range(4))]
    return result(await post_all(args, "/worker_generate_stream", bodies))


def gzip_bomb(args: argparse.Namespace) -> bytes:
    """About 260 KB of gzip that inflates to 256 MiB of zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    return b"".join([*(compressor.compress(zeros) for _ in range(256)), compressor.flush()])


@attack("gzip-bomb", gzip_bomb)
async def send_bombs(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    headers = {**JSON, "Content-Encoding": "gzip"}
    paths = ["/worker_generate_stream", "/get_worker_address"]
    async with session(args, force_close=True) as http:
        outcomes = await asyncio.gather(
            *(
                outcome(http.post(f"{args.url}{paths[i % 2]}", data=args.payload, headers=headers))
                for i in range(8)
            )
        )
    return result(list(outcomes), body_bytes=len(args.payload), inflates_to=256 * MIB)


async def pieces(data: bytes, size: int = MIB) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


@attack("oversized", lambda args: b"x" * (100 * MIB))
async def send_oversized(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """13 bodies of 100 MiB at once: 6 announce their length, 7 are chunked."""
    bodies = [io.BytesIO(args.payload) if i % 2 else pieces(args.payload) for i in range(13)]
    return result(await post_all(args, "/worker_generate_stream", bodies))


# -- slow and idle sockets ---------------------------------------------------------------------


async def hold(
    args: argparse.Namespace, count: int, opening: bytes, drip: bytes, every: float
) -> dict[str, Any]:
    """``count`` connections each send ``opening`` and then ``drip`` every ``every`` seconds
    (nothing if empty) until ``--duration`` ends; how many the controller closed, and when."""
    host, port = args.url.rsplit("//", 1)[1].rsplit(":", 1)
    end = time.monotonic() + args.duration
    closed_after: list[float] = []
    answers: Counter[str] = Counter()
    refused = 0

    async def one() -> None:
        nonlocal refused
        began = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(
                host, int(port), local_addr=(args.local_addr, 0)
            )
        except OSError:
            refused += 1
            return
        try:
            writer.write(opening)
            read = asyncio.ensure_future(reader.read(200))
            while time.monotonic() < end and not read.done():
                await asyncio.wait([read], timeout=every)
                if drip and not read.done():
                    writer.write(drip)
            if read.done():
                data = read.result() if read.exception() is None else b""
                closed_after.append(time.monotonic() - began)
                answers[data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"] += 1
            else:
                read.cancel()
        except OSError:
            closed_after.append(time.monotonic() - began)
            answers["reset"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    closed = len(closed_after)
    seen = f"{closed}/{count} closed by the controller"
    if closed:
        seen += f" after {min(closed_after):.1f}-{max(closed_after):.1f} s"
    if refused:
        seen += f", {refused} not connected"
    return {"seen": seen, "answers": dict(answers), "refused": refused, "closed": closed}


@attack("slowloris")
async def slowloris(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """200 connections sending a request head a byte every half second."""
    opening = b"POST /get_worker_address HTTP/1.1\r\nHost: c\r\nX-A: "
    return await hold(args, 200, opening, b"a", 0.5)


@attack("slow-body")
async def slow_body(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """200 connections announcing a 1,000-byte body and sending a byte every half second."""
    opening = (
        b"POST /get_worker_address HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    return await hold(args, 200, opening, b" ", 0.5)


@attack("idle-sockets")
async def idle_sockets(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """1,100 connections that never send a byte."""
    return await hold(args, 1100, b"", b"", 0.5)


# -- through workers ---------------------------------------------------------------------------


@attack("huge-answers")
async def huge_answers(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """Four /worker_generate calls at once to a worker answering 256 MiB each."""
    body = json.dumps({"model": HUGE_MODEL, "prompt": "hi"}).encode()
    return result(await post_all(args, "/worker_generate", [body] * 4))


@attack("million-models")
async def million_models(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """Four registrations without a status of a worker whose status lists a million
    model names (so the controller asks it)."""
    name = f"{args.worker}/million"
    body = json.dumps({"worker_name": name, "check_heart_beat": False}).encode()
    outcomes = await post_all(args, "/register_worker", [body] * 4)
    async with session(args) as http, http.post(f"{args.url}/list_models") as r:
        models = (await r.json())["models"]
    registered = "m0" in models
    extra = {"registered": registered, "models_listed": len(models)}
    out = result(outcomes, **extra)
    out["seen"] += ", registered" if registered else ", nothing registered"
    return out


def long_name(args: argparse.Namespace) -> bytes:
    name = "http://" + "w" * (16 * MIB)
    return json.dumps({"worker_name": name, "check_heart_beat": False, "queue_length": 0}).encode()


@attack("long-worker-name", long_name)
async def send_long_name(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """A 16 MiB worker_name, twice to each of register, heartbeat and unregister, at once."""
    paths = ["/register_worker", "/receive_heart_beat", "/unregister_worker"] * 2
    async with session(args, force_close=True) as http:
        outcomes = await asyncio.gather(
            *(
                outcome(http.post(f"{args.url}{p}", data=io.BytesIO(args.payload), headers=JSON))
                for p in paths
            )
        )
    return result(list(outcomes))


async def register_many(
    args: argparse.Namespace, names: list[str], model: str, *, check_heart_beat: bool
) -> tuple[int, float]:
    """Register ``names`` serving ``model`` over 16 connections; (failures, seconds)."""
    queue = iter(names)
    failures = 0
    status = {"model_names": [model], "speed": 1, "queue_length": 0}

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        for name in queue:
            body = {"worker_name": name, "check_heart_beat": check_heart_beat}
            body["worker_status"] = status
            async with http.post(f"{args.url}/register_worker", json=body) as r:
                await r.read()
                failures += r.status != 200

    began = time.monotonic()
    async with session(args) as http:
        await asyncio.gather(*(client(http) for _ in range(16)))
    return failures, time.monotonic() - began


async def models(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.post(f"{url}/list_models") as r:
        listed: list[str] = (await r.json())["models"]
        return listed


@attack("mass-expiry")
async def mass_expiry(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """8,000 workers of one model register with check_heart_beat and never heartbeat; the
    controller (started with a short expiration) sweeps them out together."""
    names = [f"http://127.0.0.1:1/hostile-x{i}" for i in range(8000)]
    failures, seconds = await register_many(args, names, EXPIRING_MODEL, check_heart_beat=True)
    registered = time.monotonic()
    gone_after = None
    async with session(args) as http:
        deadline = registered + args.duration + 10
        while time.monotonic() < deadline:
            if EXPIRING_MODEL not in await models(http, args.url):
                gone_after = time.monotonic() - registered
                break
            await asyncio.sleep(0.1)
    seen = f"{8000 - failures} registered in {seconds:.1f} s, "
    seen += "never all gone" if gone_after is None else f"all gone {gone_after:.1f} s later"
    phases = {} if gone_after is None else {"expiry": (registered, registered + gone_after)}
    return {"seen": seen, "failures": failures, "gone_after_s": gone_after, "phases": phases}


@attack("connect-burst")
async def connect_burst(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """Three times, a second apart: 256 new clients connect at once, each for one stream."""
    body = json.dumps({"model": args.model, "prompt": "hi", "max_new_tokens": 8}).encode()
    ttfc: list[float] = []
    failed: Counter[str] = Counter()

    async def one(http: aiohttp.ClientSession) -> None:
        began = time.monotonic()
        try:
            async with http.post(
                f"{args.url}/worker_generate_stream", data=body, headers=JSON
            ) as r:
                async for data in r.content.iter_any():
                    if b"\0" in data:
                        ttfc.append(time.monotonic() - began)
                        break
                await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            failed[type(e).__name__] += 1

    for burst in range(3):
        await asyncio.sleep(max(0.0, start_at + burst - time.monotonic()))
        async with session(args, force_close=True) as http:
            await asyncio.gather(*(one(http) for _ in range(256)))
    ttfc.sort()
    p99 = ttfc[int(0.99 * (len(ttfc) - 1))] if ttfc else None
    seen = f"{len(ttfc)}/768 streams started" + (f", TTFC p99 {p99 * 1000:.0f} ms" if p99 else "")
    return {"seen": seen, "ttfc_p99_s": p99, "failed": dict(failed)}


def fleet_names(args: argparse.Namespace) -> list[str]:
    return [f"{args.worker}/fleet/w{i}" for i in range(1000)]


async def counts(http: aiohttp.ClientSession, worker: str) -> dict[str, int]:
    async with http.get(f"{worker}/counts") as r:
        found: dict[str, int] = await r.json()
        return found


@attack("status-fanout")
async def status_fanout(args: argparse.Namespace, start_at: float) -> dict[str, Any]:
    """1,000 concurrent /worker_get_status calls with 1,000 workers registered (by the
    preparation, before the start), from four source addresses (250 each, under a
    per-source connection cap of 256), each on a connection opened beforehand so that the
    calls reach the controller together."""
    async with session(args) as http:
        before = (await counts(http, args.worker)).get("fleet_probes", 0)
    first = int(args.local_addr.rsplit(".", 1)[1])
    prefix = args.local_addr.rsplit(".", 1)[0]
    sessions = [session(args, source=f"{prefix}.{first + i}") for i in range(4)]
    try:
        # Open 250 kept-alive connections per source, then call over them all at once.
        await asyncio.gather(
            *(
                outcome(http.get(f"{args.url}/test_connection"))
                for http in sessions
                for _ in range(250)
            )
        )
        outcomes = list(
            await asyncio.gather(
                *(
                    outcome(http.post(f"{args.url}/worker_get_status"))
                    for http in sessions
                    for _ in range(250)
                )
            )
        )
    finally:
        for http in sessions:
            await http.close()
    async with session(args) as http:
        after = await counts(http, args.worker)
    probes = after["fleet_probes"] - before
    out = result(outcomes, probes=probes, most_of_one=after["fleet_most_probes_of_one"])
    out["seen"] += f", {probes} probes of 1,000 workers"
    out["answers"] = {k: v[:120] for k, v in out["answers"].items()}
    return out


# -- running one ---------------------------------------------------------------------------


async def prepare_fleet(args: argparse.Namespace) -> None:
    failures, _ = await register_many(args, fleet_names(args), FLEET_MODEL, check_heart_beat=False)
    if failures:
        raise SystemExit(f"{failures} fleet registrations failed")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prepare, fn = ATTACKS[args.attack]
    args.payload = None if prepare is None else prepare(args)
    if args.attack == "status-fanout":
        await prepare_fleet(args)
    if args.idle:
        # Below every normal process of the load core: see Hostile.start in hostile.py.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    late = time.monotonic() - args.start_at
    await asyncio.sleep(max(0.0, -late))
    started = time.monotonic()
    details = await fn(args, started)
    return {
        "attack": args.attack,
        "started": started,
        "ended": time.monotonic(),
        "late_s": max(0.0, late),
        **details,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--url", required=True, help="the controller's base URL")
    parser.add_argument("--worker", help="the hostile workers' base URL (hostile_worker.py)")
    parser.add_argument("--model", default="bench-model", help="the model normal streams use")
    parser.add_argument("--start-at", type=float, required=True, help="time.monotonic() instant")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--local-addr", default="127.0.0.3")
    parser.add_argument(
        "--idle", action="store_true", help="move to the idle scheduling class once prepared"
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
