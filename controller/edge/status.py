"""The operator's routes: ``GET /status`` (the HTML page), ``GET /api/workers`` and
``GET /api/models`` (the same data as JSON for tools).

They belong to the client role (see ``edge/access.py``). Query parameters are checked
like request bodies: a bad one gets HTTP 400 naming it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .. import protocol
from ..decisions.overview import WorkerView, summarize, view_of
from ..decisions.routing import Router
from ..errors import BadRequestError
from ..status_format import About, models_document, worker_items, workers_document
from ..version import __version__
from . import status_page
from .access import Handler

__all__ = ["MAX_ROWS", "SLICE", "StatusRoutes", "query_count"]

#: the most rows ``/status?rows=`` may ask for in each table
MAX_ROWS = 100_000
#: the longest ``?refresh=`` (seconds)
MAX_REFRESH = 86_400
#: workers viewed and encoded (or page rows rendered) between two yields to the loop
SLICE = 500

_JSON_HEADERS = {"Cache-Control": "no-store"}


def query_count(request: web.Request, name: str, default: int, lowest: int, highest: int) -> int:
    """The whole number in query parameter ``name`` (``default`` when absent);
    :class:`BadRequestError` naming it when it is not one between ``lowest`` and ``highest``."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not lowest <= int(raw) <= highest:
        raise BadRequestError(
            name, f"must be a whole number from {lowest} to {highest}, got {raw[:40]!r}"
        )
    return int(raw)


def _model(request: web.Request) -> str | None:
    model = request.query.get("model")
    if model is not None and not model:
        raise BadRequestError("model", "must name a model, got ''")
    return model


async def _yield_to_loop() -> None:
    await asyncio.sleep(0)


class StatusRoutes:
    """The handlers of the three routes, over one router (and its registry).

    A view of a large registry is built, encoded and rendered ``slice_size`` workers (or
    page rows) at a time, awaiting ``pause`` between two slices, so heartbeats and
    dispatch go on meanwhile: 10,000 workers cost tens of milliseconds of CPU, never all
    at once. The workers shown are those live when the request arrived.
    """

    def __init__(
        self,
        router: Router,
        *,
        slice_size: int = SLICE,
        pause: Callable[[], Awaitable[None]] = _yield_to_loop,
    ) -> None:
        self.router = router
        self.registry = router.registry
        self.slice_size = slice_size
        self.pause = pause

    def routes(self) -> dict[str, Handler]:
        """Path -> handler, for ``GET`` routes."""
        return {
            "/status": self.status,
            "/api/workers": self.api_workers,
            "/api/models": self.api_models,
        }

    def about(self) -> About:
        return About(
            __version__,
            self.router.method.value,
            self.registry.expiration,
            self.router.wall_clock(),
        )

    async def status(self, request: web.Request) -> web.StreamResponse:
        try:
            rows = query_count(request, "rows", status_page.DEFAULT_ROWS, 1, MAX_ROWS)
            refresh = query_count(request, "refresh", status_page.DEFAULT_REFRESH, 0, MAX_REFRESH)
            model = _model(request)
        except BadRequestError as e:
            return _bad_request(e)
        about = self.about()
        shown = [view async for view in self._views(model)]
        parts: list[str] = []
        size = self.slice_size
        for part in status_page.render(about, shown, rows=rows, refresh=refresh, model=model):
            parts.append(part)
            if len(parts) % size == 0:
                await self.pause()
        return web.Response(
            text="".join(parts),
            content_type="text/html",
            charset="utf-8",
            headers=status_page.HEADERS,
        )

    async def api_workers(self, request: web.Request) -> web.StreamResponse:
        try:
            model = _model(request)
        except BadRequestError as e:
            return _bad_request(e)
        about = self.about()
        items: list[bytes] = []
        batch: list[WorkerView] = []
        async for view in self._views(model):
            batch.append(view)
            if len(batch) == self.slice_size:
                items.append(worker_items(batch))
                batch.clear()
        items.append(worker_items(batch))
        return _json(workers_document(about, items))

    async def api_models(self, request: web.Request) -> web.StreamResponse:
        about = self.about()
        shown = [view async for view in self._views(None)]
        return _json(models_document(about, summarize(shown)))

    async def _views(self, model: str | None) -> AsyncIterator[WorkerView]:
        """The live workers (those serving ``model``), viewed a slice at a time: the
        caller's work on each view runs before the next pause too."""
        registry = self.registry
        now = registry.clock()
        expiration = registry.expiration
        workers = [w for w in registry if model is None or model in w.info.model_names]
        size = self.slice_size
        for start in range(0, len(workers), size):
            if start:
                await self.pause()
            for worker in workers[start : start + size]:
                yield view_of(worker, now, expiration)


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers=_JSON_HEADERS)


def _bad_request(error: BadRequestError) -> web.Response:
    return web.Response(
        body=protocol.error_body(error), status=400, content_type="application/json"
    )
