"""The exact-knowledge reference dispatcher.

It speaks enough of the controller protocol for the benchmark (``/register_worker``,
``/receive_heart_beat``, ``/get_worker_address``, ``/worker_generate_stream``,
``/list_models``, ``/test_connection``) but ignores every reported queue length. Instead it
knows the truth:

- each worker's service time and slot count, given when it is built;
- each worker's work in flight: +1 when it hands the worker a request (by address or by
  relaying), -1 when the worker says on ``/worker_finished`` (a side channel stock workers do
  not have) that a request has sent its last message. Dispatch happens before the request
  reaches the worker and the finish report after it leaves, so the count is never low.

It picks the worker where a new request would finish first, assuming a request waits for
whole batches of ``slots`` ahead of it: ``service_time * ceil((in_flight + 1) / slots)``;
ties go to the fewer requests in flight, then to the earliest registered.
"""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
from aiohttp import web

from . import MODEL

_ERROR_TEXT = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"


class ExactDispatcher:
    """A dispatcher that knows every worker's real load and speed (see the module doc)."""

    def __init__(self, service_times: dict[str, float], slots: int) -> None:
        self.service_times = dict(service_times)
        self.slots = slots
        self.in_flight: dict[str, int] = {}  # registered workers, in registration order
        self.dispatched: dict[str, int] = {}
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/register_worker", self.register_worker)
        app.router.add_post("/receive_heart_beat", self.receive_heart_beat)
        app.router.add_post("/get_worker_address", self.get_worker_address)
        app.router.add_post("/worker_generate_stream", self.worker_generate_stream)
        app.router.add_post("/worker_finished", self.worker_finished)
        app.router.add_post("/list_models", self.list_models)
        app.router.add_get("/test_connection", self.test_connection)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=100)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            self.session = session
            yield
            self.session = None

    def pick(self) -> str | None:
        """The worker where one more request would finish soonest; counts it as sent there."""
        best: str | None = None
        best_key = (math.inf, math.inf)
        for name, n in self.in_flight.items():
            expected = self.service_times[name] * math.ceil((n + 1) / self.slots)
            key = (expected, float(n))
            if key < best_key:
                best, best_key = name, key
        if best is not None:
            self.in_flight[best] += 1
            self.dispatched[best] = self.dispatched.get(best, 0) + 1
        return best

    async def register_worker(self, request: web.Request) -> web.Response:
        body = await request.json(loads=json.loads)
        name = body["worker_name"]
        if name not in self.service_times:
            raise web.HTTPBadRequest(text=f"unknown worker {name!r}: not one of the benchmark's")
        self.in_flight.setdefault(name, 0)
        return web.json_response(None)

    async def receive_heart_beat(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"exist": body["worker_name"] in self.in_flight})

    async def worker_finished(self, request: web.Request) -> web.Response:
        name = (await request.json())["worker_name"]
        if self.in_flight.get(name, 0) > 0:
            self.in_flight[name] -= 1
        return web.json_response(None)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [MODEL] if self.in_flight else []})

    async def test_connection(self, request: web.Request) -> web.Response:
        return web.json_response("success")

    async def get_worker_address(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"address": self.pick() or ""})

    async def worker_generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        name = self.pick()
        response = web.StreamResponse()
        await response.prepare(request)
        if name is None:
            await response.write(json.dumps({"text": _ERROR_TEXT, "error_code": 50005}).encode())
            await response.write(b"\0")
            return response
        assert self.session is not None
        try:
            async with self.session.post(
                f"{name}/worker_generate_stream",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as upstream:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            await response.write(json.dumps({"text": _ERROR_TEXT, "error_code": 50006}).encode())
            await response.write(b"\0")
        await response.write_eof()
        return response
