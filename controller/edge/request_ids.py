"""Request ids and response counts at the edge: each request gets its id before anything
else runs, its answer carries it back in ``X-Request-Id``, and the answer is counted by
route and status as it starts.

:class:`Tagging` does both at the three points of a request: :meth:`~Tagging.begin` sets
the id in a context variable of the request's task (for log lines and relays);
:meth:`~Tagging.answered` writes it into the answer the handler returned and counts it,
:meth:`~Tagging.refused` into an aiohttp HTTP error the handler raised; a stream's answer,
prepared inside the relay, gets its id and is counted there, as it starts.

Two places call them. A standalone controller's connection layer
(:mod:`~controller.edge.client_connections`) calls them from the one step it already runs
per request, so every request, aiohttp's own 404 and 405 included, costs one frame for
connection bounds, id and count together. A controller attached to a host application
wraps each of its routes with :func:`with_request_id` instead (the host's requests are
none of its business), and counts every answer, the host's too, with an
``on_response_prepare`` receiver.
"""

from __future__ import annotations

from aiohttp import web

from ..relay.tally import Count, uncounted
from ..requestid import HEADER, REQUEST_ID, accept
from .access import Handler

__all__ = ["Tagging", "with_request_id"]


class Tagging:
    """Gives requests their ids and counts their answers with ``count`` (by default not at
    all: an ``on_response_prepare`` receiver counts them instead)."""

    __slots__ = ("_count",)

    def __init__(self, count: Count = uncounted) -> None:
        self._count = count

    @staticmethod
    def begin(request: web.Request) -> str:
        """The request's id (the client's if acceptable, else a fresh one), now set in
        :data:`~controller.requestid.REQUEST_ID` for the request's task."""
        value = accept(request.headers.get(HEADER))
        REQUEST_ID.set(value)
        return value

    def answered(self, request: web.Request, response: web.StreamResponse, value: str) -> None:
        """The handler returned ``response``: it carries the id and counts, unless it
        started inside the handler (a stream, which got both as it started)."""
        if not response.prepared:
            response.headers[HEADER] = value
            self._count(request, response.status)

    def refused(self, request: web.Request, error: web.HTTPException, value: str) -> None:
        """The handler (or aiohttp's routing: 404, 405) raised ``error``, its answer."""
        error.headers[HEADER] = value
        self._count(request, error.status)

    def failed(self, request: web.Request) -> None:
        """The handler raised anything else: aiohttp answers 500."""
        self._count(request, 500)


_ROUTES = Tagging()


def with_request_id(handler: Handler) -> Handler:
    """``handler``, run with the request's id in :data:`~controller.requestid.REQUEST_ID`
    and answering with it in ``X-Request-Id`` (not counted: see the module's text)."""

    async def tagged(request: web.Request) -> web.StreamResponse:
        value = _ROUTES.begin(request)
        try:
            response = await handler(request)
        except web.HTTPException as e:
            _ROUTES.refused(request, e, value)
            raise
        _ROUTES.answered(request, response, value)
        return response

    return tagged
