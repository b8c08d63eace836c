"""Relaying a worker call answered by one JSON document (``/worker_generate``,
``/count_token``, ...) through the controller's shared aiohttp client session."""

from __future__ import annotations

import logging

import aiohttp

from ..protocol import worker_url

__all__ = ["forward_request"]

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}


async def forward_request(
    session: aiohttp.ClientSession,
    worker_name: str,
    path: str,
    body: bytes,
) -> bytes | None:
    """POST ``body`` to ``path`` on a worker; its answer, or ``None`` if it failed.

    The session's own timeout bounds the worker's silence, not the answer's length. Any
    answer but an HTTP 200 counts as a failure, which the caller turns into an in-band
    error.
    """
    url = worker_url(worker_name, path)
    try:
        async with session.post(url, data=body, headers=_JSON_HEADERS) as response:
            if response.status != 200:
                log.debug("worker %s answered %s with HTTP %d", worker_name, path, response.status)
                return None
            return await response.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.debug("worker %s failed %s: %r", worker_name, path, e)
        return None
