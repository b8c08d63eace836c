"""FastChat-shaped model workers with real concurrency limits and service times.

    python -m dispatch_sim.workers --controller URL --ports 4101,4102 --service-times 0.2,0.8

Each worker is its own aiohttp server on 127.0.0.1 and behaves like a stock FastChat 0.2.36
worker (``fastchat/serve/base_model_worker.py``) as far as the controller can tell:

- ``/worker_generate_stream`` waits for one of ``--slots`` slots (an asyncio.Semaphore, as
  FastChat's ``limit_worker_concurrency``), then streams ``--messages`` NUL-terminated JSON
  messages with the cumulative text, spread evenly over the worker's service time;
- ``/worker_get_status`` answers ``{model_names, speed: 1, queue_length}`` live, where the
  queue length counts requests running plus requests waiting for a slot, as FastChat's
  ``get_queue_length`` does;
- it registers with ``check_heart_beat: true`` and then POSTs ``/receive_heart_beat`` with
  its live queue length every ``--heartbeat`` seconds, re-registering on ``exist: false``.
  Nothing else is reported, so a controller learns only from heartbeats, its own probes and
  what it relays.

Workers that have been running for a while heartbeat at unrelated moments, so the first
heartbeat of worker ``i`` comes after a phase spread evenly over one interval (the order
shuffled by ``--seed``, the same for every dispatcher).

With ``--notify URL`` (used only for the exact-knowledge reference) each worker also POSTs
``{"worker_name"}`` to ``URL`` as soon as a request has sent its last message: that side
channel is what lets the reference know the true work in flight.

Every message carries an extra ``worker`` key naming the worker, which clients ignore and
the benchmark uses to attribute proxied requests. When all workers are registered the
process prints one JSON line on stdout and then serves until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from . import MODEL

logger = logging.getLogger("dispatch_sim.workers")

_TIMEOUT = aiohttp.ClientTimeout(total=5)


class Worker:
    """One fake model worker: its slots, its live counters and its heartbeat routine."""

    def __init__(
        self,
        *,
        name: str,
        service_time: float,
        slots: int,
        messages: int,
        session: aiohttp.ClientSession,
        notify_url: str | None,
    ) -> None:
        self.name = name
        self.service_time = service_time
        self.slots = slots
        self.messages = messages
        self.session = session
        self.notify_url = notify_url
        self.semaphore = asyncio.Semaphore(slots)
        self.in_flight = 0  # running + waiting for a slot: FastChat's queue_length
        self.running = 0
        self.served = 0
        self._notifications: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, object]:
        return {"model_names": [MODEL], "speed": 1, "queue_length": self.in_flight}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/worker_generate_stream", self.generate_stream)
        app.router.add_post("/worker_get_status", self.get_status)
        app.router.add_route("*", "/true_state", self.true_state)
        return app

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def true_state(self, request: web.Request) -> web.Response:
        """Debugging aid: what the worker really has, beyond what FastChat reports."""
        return web.json_response(
            {
                "in_flight": self.in_flight,
                "running": self.running,
                "served": self.served,
                "service_time": self.service_time,
                "slots": self.slots,
            }
        )

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.in_flight += 1
        try:
            async with self.semaphore:
                self.running += 1
                try:
                    return await self._stream(request)
                finally:
                    self.running -= 1
        finally:
            self.in_flight -= 1
            self.served += 1
            self._notify()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        step = self.service_time / self.messages
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(1, self.messages + 1):
            # Sleep to the i-th tick rather than by `step` so timer slack does not add up.
            await asyncio.sleep(max(0.0, start + i * step - loop.time()))
            message: dict[str, object] = {
                "text": "tok " * i,
                "error_code": 0,
                "worker": self.name,
            }
            if i == self.messages:
                message["finish_reason"] = "stop"
                message["usage"] = {"prompt_tokens": 8, "completion_tokens": i}
            await response.write(json.dumps(message).encode() + b"\0")
        await response.write_eof()
        return response

    def _notify(self) -> None:
        if self.notify_url is None:
            return
        task = asyncio.create_task(self._post_finished(self.notify_url))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _post_finished(self, url: str) -> None:
        try:
            async with self.session.post(
                url, json={"worker_name": self.name}, timeout=_TIMEOUT
            ) as r:
                await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("%s: could not report a finished request: %r", self.name, exc)

    async def register(self, controller: str) -> None:
        """Register like FastChat's ``register_to_controller``; retried while it starts."""
        body = {
            "worker_name": self.name,
            "check_heart_beat": True,
            "worker_status": self.status(),
            "multimodal": False,
        }
        for _ in range(50):
            try:
                async with self.session.post(
                    f"{controller}/register_worker", json=body, timeout=_TIMEOUT
                ) as r:
                    if r.status == 200:
                        return
                    logger.warning("%s: register got HTTP %d", self.name, r.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("%s: register failed: %r", self.name, exc)
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} could not register with {controller}")

    async def heartbeat_forever(self, controller: str, interval: float, phase: float) -> None:
        """FastChat's ``heart_beat_worker``: sleep the interval, then report the queue."""
        await asyncio.sleep(phase)
        while True:
            exist = True
            try:
                async with self.session.post(
                    f"{controller}/receive_heart_beat",
                    json={"worker_name": self.name, "queue_length": self.in_flight},
                    timeout=_TIMEOUT,
                ) as r:
                    exist = bool((await r.json(content_type=None))["exist"])
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                logger.warning("%s: heartbeat failed: %r", self.name, exc)
            if not exist:
                await self.register(controller)
            await asyncio.sleep(interval)


def heartbeat_phases(count: int, interval: float, seed: int) -> list[float]:
    """First-heartbeat delays spread evenly over one interval, in a seeded order."""
    phases = [interval * (i + 0.5) / count for i in range(count)]
    random.Random(seed).shuffle(phases)
    return phases


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dispatch_sim.workers", description=__doc__.split("\n")[0])
    p.add_argument("--controller", required=True, help="controller base URL")
    p.add_argument("--ports", type=_ints, required=True, help="comma-separated, one per worker")
    p.add_argument("--service-times", type=_floats, required=True, help="seconds, one per port")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--messages", type=int, default=8)
    p.add_argument("--heartbeat", type=float, default=45.0, help="seconds between heartbeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--notify", default=None, help="URL told of each finished request")
    args = p.parse_args(argv)
    if len(args.ports) != len(args.service_times):
        p.error("--ports and --service-times must have the same length")
    return args


async def serve(args: argparse.Namespace) -> None:
    phases = heartbeat_phases(len(args.ports), args.heartbeat, args.seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [
            Worker(
                name=f"http://127.0.0.1:{port}",
                service_time=st,
                slots=args.slots,
                messages=args.messages,
                session=session,
                notify_url=args.notify,
            )
            for port, st in zip(args.ports, args.service_times, strict=True)
        ]
        runners: list[web.AppRunner] = []
        heartbeats: list[asyncio.Task[None]] = []
        try:
            for worker, port in zip(workers, args.ports, strict=True):
                runner = web.AppRunner(worker.app(), access_log=None, handle_signals=False)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
            # One after the other, so registration order (the controllers' tie-break order)
            # is the order of --ports.
            for worker in workers:
                await worker.register(args.controller)
            for worker, phase in zip(workers, phases, strict=True):
                heartbeats.append(
                    asyncio.create_task(
                        worker.heartbeat_forever(args.controller, args.heartbeat, phase)
                    )
                )
            ready = {"workers": [w.name for w in workers], "phases": phases}
            print(json.dumps(ready), flush=True)
            await asyncio.Event().wait()
        finally:
            for task in heartbeats:
                task.cancel()
            for runner in runners:
                await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(serve(args))


if __name__ == "__main__":
    main()
