"""Request ids at the edge: each route's request gets its id before anything else runs,
and every answer carries it back in ``X-Request-Id``.

Both are cheap enough for ``/get_worker_address``: the route wrapper is a plain function
(no coroutine frame of its own) that reads one header and sets a context variable, and the
echo is one ``on_response_prepare`` receiver, which also covers answers prepared inside a
relay (streams) and aiohttp's own (404, 405, raised HTTP errors).
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web

from ..requestid import HEADER, REQUEST_ID, accept
from .access import Handler, coroutine_function

__all__ = ["echo_request_id", "with_request_id"]


def with_request_id(handler: Handler) -> Handler:
    """``handler``, run with the request's id in :data:`~controller.requestid.REQUEST_ID`."""

    def tagged(request: web.Request) -> Awaitable[web.StreamResponse]:
        REQUEST_ID.set(accept(request.headers.get(HEADER)))
        return handler(request)

    return coroutine_function(tagged)


async def echo_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` receiver: the answer carries the request's id (one is
    made for a request no route of ours saw, such as a 404), unless it set its own."""
    value = REQUEST_ID.get()
    if value is None:
        value = accept(request.headers.get(HEADER))
        REQUEST_ID.set(value)
    response.headers.setdefault(HEADER, value)
