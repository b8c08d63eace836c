"""Relaying a worker call answered by one JSON document (``/worker_generate``,
``/count_token``, ...) over the relay's own connections.

The answer goes through the same parser, checks and bounds as a stream's
(:class:`~controller.relay.upstream.Upstream`), is collected whole up to
``max_worker_answer_size`` bytes reserved in the shared budget, and is then answered in one
piece. The client's departure and the shutdown drain stop it as they stop a stream.
"""

from __future__ import annotations

import logging

from aiohttp import web

from ..joining import Chunks
from .reach import Reach
from .stream import Outcome
from .upstream import Upstream
from .watch import client_gone

__all__ = ["relay_document"]

log = logging.getLogger(__name__)


async def relay_document(
    request: web.Request | None,
    worker_name: str,
    path: str,
    body: bytes | bytearray,
    reach: Reach,
    answer_limit: int,
) -> tuple[bytes | bytearray | None, Outcome]:
    """POST ``body`` to ``path`` on a worker; its answer and how the call ended.

    Never raises for I/O. The answer is ``None`` unless the outcome is ``COMPLETED``; an
    answer over ``answer_limit`` bytes is refused. A ``request`` is watched for its client
    leaving (and for the shutdown drain).
    """
    target = reach.pool.target(worker_name, path)
    if target is None:
        log.debug("worker %s has no usable http(s) address", worker_name)
        return None, Outcome.FAILED_BEFORE_START
    fresh = False
    while True:
        upstream = await reach.send(target, body, request, fresh=fresh, document_limit=answer_limit)
        try:
            while not upstream.ended:
                await upstream.wait()
            if upstream.stale:
                # A kept-alive connection the worker had closed: once more on a new one.
                fresh = True
                continue
            document, outcome = _outcome(request, upstream, worker_name, path)
        finally:
            reach.release(upstream, request)
        # Joined a step at a time (pacing.bulk_step), not in one go (up to
        # --max-worker-answer-size).
        return (None if document is None else await document.joined()), outcome


def _outcome(
    request: web.Request | None, upstream: Upstream, worker_name: str, path: str
) -> tuple[Chunks | None, Outcome]:
    if request is not None and client_gone(request):
        return None, Outcome.CLIENT_GONE
    if upstream.stopped:
        return None, Outcome.ABORTED
    if upstream.refused is not None:
        log.warning("refused %s's answer to %s: %s", worker_name, path, upstream.refused)
        return None, Outcome.REFUSED
    if upstream.failure is not None or upstream.document is None:
        log.debug("worker %s failed %s: %r", worker_name, path, upstream.failure)
        return None, Outcome.FAILED_BEFORE_START
    return upstream.document, Outcome.COMPLETED
