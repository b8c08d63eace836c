"""Request ids at the edge: each route's request gets its id before anything else runs,
and its answer carries it back in ``X-Request-Id``.

The wrapper sets the id in a context variable of the request's task, for log lines and
relays, and writes it into the answer the handler returns (or raises, for aiohttp's HTTP
errors); a stream's answer, prepared inside the relay, gets it there. This costs about
half what an ``on_response_prepare`` receiver did on ``/get_worker_address``; aiohttp's
own 404 and 405, for paths and methods no route serves, go without.
"""

from __future__ import annotations

from aiohttp import web

from ..requestid import HEADER, REQUEST_ID, accept
from .access import Handler

__all__ = ["with_request_id"]


def with_request_id(handler: Handler) -> Handler:
    """``handler``, run with the request's id in :data:`~controller.requestid.REQUEST_ID`
    and answering with it in ``X-Request-Id``."""

    async def tagged(request: web.Request) -> web.StreamResponse:
        value = accept(request.headers.get(HEADER))
        REQUEST_ID.set(value)
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers[HEADER] = value
            raise
        if not response.prepared:
            response.headers[HEADER] = value
        return response

    return tagged
