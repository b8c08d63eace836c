"""The demo worker's HTTP side, ``DemoWorker``: FastChat's worker API on its own socket.

It serves the routes FastChat's controller, OpenAI-compatible API server and web UI use,
limits its own concurrency like a real worker, and registers and heartbeats through
``HeartbeatClient``. What it answers comes from ``controller.worker.demo.model``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..client import HeartbeatClient
from ..config import HeartbeatConfig
from ..limiter import ConcurrencyLimiter
from ..runtime import AsyncLifecycle
from . import model
from .model import InvalidRequest
from .settings import DemoSettings

__all__ = ["DemoWorker"]


async def _read_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


def _bad_request(error: InvalidRequest) -> web.Response:
    return web.json_response({"error": "bad_request", "message": str(error)}, status=400)


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DemoWorker(AsyncLifecycle):
    """A fake model worker on its own listening socket.

    ``async with DemoWorker(settings) as worker:`` (or ``await start()`` and
    ``await aclose()``) serves it, registers it with the controller unless
    ``settings.register`` is false, and on close tells the controller it is leaving before
    it stops listening. ``make_app()`` gives the bare application for embedding or tests.
    """

    def __init__(
        self, settings: DemoSettings | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.settings = settings if settings is not None else DemoSettings()
        self.limiter = ConcurrencyLimiter(self.settings.limit_worker_concurrency)
        self.heartbeat: HeartbeatClient | None = None
        self._rng = rng if rng is not None else random.Random(self.settings.seed)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._worker_address: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then start registering and heartbeating (in the background)."""
        if self._runner is not None:
            raise RuntimeError("this DemoWorker is already running")
        cfg = self.settings
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            # A client that goes away ends its generation (and frees its slot) at once.
            handler_cancellation=True,
            shutdown_timeout=cfg.shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True, backlog=cfg.backlog)
            await site.start()
            port = cfg.port
            for address in runner.addresses:
                if isinstance(address, tuple) and len(address) >= 2:
                    port = address[1]
                    break
            host = cfg.host if cfg.host not in ("", "0.0.0.0", "::") else None
            url_host = host or "0.0.0.0"
            self._url = f"http://{_bracket(url_host)}:{port}"
            self._worker_address = (
                cfg.worker_address or f"http://{_bracket(host or 'localhost')}:{port}"
            )
            if cfg.register:
                self.heartbeat = HeartbeatClient(
                    HeartbeatConfig(
                        controller_address=cfg.controller_address,
                        worker_address=self._worker_address,
                        model_names=cfg.model_names,
                        multimodal=cfg.multimodal,
                        interval=cfg.heart_beat_interval,
                        token=cfg.controller_token,
                    ),
                    self.limiter,
                )
                await self.heartbeat.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def aclose(self) -> None:
        """Say goodbye to the controller, then stop serving. Idempotent."""
        runner, self._runner = self._runner, None
        try:
            if self.heartbeat is not None:
                await self.heartbeat.aclose()
        finally:
            if runner is not None:
                await runner.cleanup()

    @property
    def url(self) -> str:
        """The URL this worker listens on (with the real port if 0 was asked)."""
        if self._url is None:
            raise RuntimeError("the DemoWorker is not running: start() it first")
        return self._url

    @property
    def worker_address(self) -> str:
        """The address this worker registers with (``--worker-address``)."""
        if self._worker_address is None:
            raise RuntimeError("the DemoWorker is not running: start() it first")
        return self._worker_address

    def make_app(self) -> web.Application:
        """The worker's routes, as an application not yet started."""
        app = web.Application()
        routes: dict[str, Callable[[web.Request], Any]] = {
            "/worker_generate_stream": self.handle_generate_stream,
            "/worker_generate": self.handle_generate,
            "/worker_get_embeddings": self.handle_embeddings,
            "/worker_get_status": self.handle_status,
            "/count_token": self.handle_count_token,
            "/worker_get_conv_template": self.handle_conv_template,
            "/model_details": self.handle_model_details,
        }
        app.add_routes([web.post(path, handler) for path, handler in routes.items()])
        return app

    # -- what it says ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/worker_get_status`` answers."""
        return {
            "model_names": list(self.settings.model_names),
            "speed": 1,
            "queue_length": self.limiter.queue_length,
        }

    def conv_template(self) -> dict[str, Any]:
        """A conversation template shaped like FastChat's ``Conversation``."""
        return model.conv_template(self.settings.conv_template)

    # -- handlers --------------------------------------------------------------------------

    async def _plan(self, request: web.Request) -> model.Plan:
        return model.plan_generation(await _read_object(request), self.settings, self._rng)

    async def handle_generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            plan = await self._plan(request)
        except InvalidRequest as e:
            # Like every generation error, in-band with HTTP 200.
            return web.Response(body=model.frame(e.message()))
        async with self.limiter:
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                async for message in model.generate(plan, self.settings.stream_interval):
                    await response.write(model.frame(message))
            except model.Drop:
                _drop_connection(request)
                return response
            await response.write_eof()
            return response

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            plan = await self._plan(request)
        except InvalidRequest as e:
            return web.json_response(e.message())
        last: dict[str, Any] = {}
        async with self.limiter:
            try:
                async for message in model.generate(plan, self.settings.stream_interval):
                    last = message
            except model.Drop:
                _drop_connection(request)
                return web.Response()
        return web.json_response(last)

    async def handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            params = await _read_object(request)
            inputs = model.embedding_inputs(params)
        except InvalidRequest as e:
            return web.json_response(e.message())
        dim = self.settings.embedding_dim
        async with self.limiter:
            vectors = [model.fake_embedding(text, dim) for text in inputs]
        embedding = model.encode_embeddings(vectors, params.get("encoding_format"))
        token_num = sum(model.count_tokens(text) for text in inputs)
        return web.json_response({"embedding": embedding, "token_num": token_num})

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.status())

    async def handle_count_token(self, request: web.Request) -> web.StreamResponse:
        try:
            count = model.prompt_tokens(await _read_object(request))
        except InvalidRequest as e:
            return _bad_request(e)
        return web.json_response({"count": count, "error_code": 0})

    async def handle_conv_template(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"conv": self.conv_template()})

    async def handle_model_details(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"context_length": self.settings.context_length})
