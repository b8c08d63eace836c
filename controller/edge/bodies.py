"""A request body that comes after its head, read within its limit: gathered as it
arrives, and refused with the answer the client is due (413 past the limit, 408 past
``--body-timeout``, 400 for a body cut short or that does not decode).

A body of more than one chunk is kept as its chunks until all of it has come (a body
refused past its limit is never copied), then joined into one bytearray a step at a time
in the lane of large work (:func:`controller.joining.joined`). The bytearray is the body
from then on; nothing changes it, and the JSON check and the relay read it as they read
bytes.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .. import protocol
from ..errors import BodyTimeoutError
from ..joining import Chunks

__all__ = ["Limit", "receive", "too_large"]

log = logging.getLogger(__name__)

_JSON = "application/json"

#: a body limit, and the setting that sets it (named in the 413's message)
Limit = tuple[int, str]


async def receive(request: web.Request, limit: Limit) -> bytes | bytearray:
    """The rest of ``request``'s body, refused past ``limit`` bytes as it arrives (the
    application's own limit is the larger of the two settings, so aiohttp's check never
    fires first). One chunk comes back as it came, more joined into one buffer a step at
    a time (:func:`~controller.joining.joined`)."""
    try:
        return await _gathered(request, limit)
    except web.RequestPayloadError:
        # The body does not decode (corrupt gzip or deflate data): the client's fault, and
        # aiohttp would make it a 500.
        message = "request body cannot be decoded as its Content-Encoding says"
        raise _refusal(web.HTTPBadRequest, message) from None
    except BodyTimeoutError as e:
        # --body-timeout: the rest of the body is never read, so the connection closes.
        answer = {"error": "request_timeout", "field": None, "message": str(e)}
        refusal = web.HTTPRequestTimeout(text=protocol.encode(answer).decode(), content_type=_JSON)
        refusal.force_close()
        raise refusal from None
    except ConnectionResetError:
        # The client left halfway through its body. Nobody reads the answer; raising an
        # HTTP error (rather than letting this through) keeps aiohttp from logging a
        # traceback at ERROR for every such client.
        log.debug("client left while sending its request body")
        raise _refusal(web.HTTPBadRequest, "request body ended early") from None


async def _gathered(request: web.Request, limit: Limit) -> bytes | bytearray:
    stream = request.content
    chunks = Chunks()
    while chunk := await stream.readany():
        chunks.add(chunk)
        if chunks.size > limit[0]:
            # Dropped before raising: the exception's traceback keeps this frame, and with
            # it whatever it holds, alive until a full garbage collection.
            chunks.clear()
            del chunk
            raise too_large(limit)
    return await chunks.joined()


def too_large(limit: Limit) -> web.HTTPRequestEntityTooLarge:
    """The 413 for a body past ``limit``."""
    size, setting = limit
    message = f"request body is larger than {size} bytes ({setting})"
    body = protocol.encode({"error": "payload_too_large", "field": None, "message": message})
    error = web.HTTPRequestEntityTooLarge(
        max_size=size, actual_size=size + 1, text=body.decode(), content_type=_JSON
    )
    # "Connection: close": the rest of the body is read and dropped unparsed (see
    # client_connections.py), so nothing after it on this connection would be read.
    error.force_close()
    return error


def _refusal(exception: type[web.HTTPClientError], message: str) -> web.HTTPClientError:
    body = protocol.encode({"error": "bad_request", "field": None, "message": message})
    return exception(text=body.decode(), content_type=_JSON)
