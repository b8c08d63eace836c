"""The HTTP edge: the routes, each a thin handler that parses the request, asks the part of
the controller that decides or relays, and answers.

Bad input never reaches the registry: parsing raises ``BadRequestError`` first, and it is
answered here with HTTP 400 and a JSON body naming the field and the problem.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from .. import protocol
from ..credentials import Access
from ..decisions.registry import Registry
from ..decisions.routing import Router
from ..errors import BadRequestError, ForbiddenError, RegistryFullError
from ..jsonbody import INLINE, BodyReader, Fields, read_as
from ..logtext import brief
from ..pacing import Allowance, Pacer
from ..relay.failover import Relay
from ..upkeep.probing import Prober
from .access import CALLER, Gate, Handler, source_of
from .bodies import Limit, receive
from .bodies import too_large as _too_large
from .metrics import Metrics
from .request_ids import with_request_id
from .status import StatusRoutes

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

_JSON = "application/json"
_NO_ADDRESS = protocol.encode({"address": ""})
#: a JSON answer's headers, made once (aiohttp copies them: cheaper than content_type=)
_JSON_HEADERS = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_TYPE: _JSON}))


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers=_JSON_HEADERS)


def _bad_request(error: BadRequestError) -> web.Response:
    log.debug("bad request: %s", error)
    return _json(protocol.error_body(error), status=400)


def _forbidden(error: ForbiddenError) -> web.Response:
    log.debug("refused: %s", error)
    body = {"error": "forbidden", "field": "worker_name", "message": str(error)}
    return _json(protocol.encode(body), status=403)


#: registrations that go on in one turn of the loop, fewer after a long turn (see
#: pacing.Allowance); the others wait for the turns after, in order. A registration is the
#: costliest control request (0.3 ms: its body, the address policy, the registry, a log
#: line): sixteen connections registering workers as fast as they could ran two or three
#: a turn, and every other client's request waited out 2-3 ms of them
REGISTRATIONS_PER_TURN = 2

#: what a refused registration is told to wait (seconds): silent workers expire meanwhile
RETRY_AFTER = 30


def _owned(handler: Handler) -> Handler:
    """``handler``, answering 400 for a body that breaks the contract and 403 when it would
    change a registration someone else owns."""

    async def refusing(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequestError as e:
            return _bad_request(e)
        except ForbiddenError as e:
            return _forbidden(e)
        except RegistryFullError as e:
            log.warning("Refused a registration: %s", e)
            body = {"error": "registry_full", "field": "worker_name", "message": e.problem}
            answer = _json(protocol.encode(body), status=503)
            answer.headers["Retry-After"] = str(RETRY_AFTER)
            return answer

    return refusing


def _arrived(request: web.Request, limit: Limit) -> bytes | None:
    """The request's body if all of it has arrived already (as a small body usually has,
    with its head), read without awaiting; ``None`` when more is to come. Refusals as
    :func:`_read`'s."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)  # case-insensitive once, not per call
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        # Refused unread: a compressed body can inflate a thousandfold (a gzip bomb), and
        # no FastChat client compresses what it sends.
        body = protocol.encode(
            {
                "error": "unsupported_media_type",
                "field": "Content-Encoding",
                "message": f"request bodies must not be compressed, got {encoding[:40]!r}",
            }
        )
        raise web.HTTPUnsupportedMediaType(text=body.decode(), content_type=_JSON)
    stream = request.content
    if stream.is_eof() and stream.exception() is None:
        raw = stream.read_nowait()
        if len(raw) > limit[0]:
            raise _too_large(limit)
        return raw
    # More is to come: refused by the length it says before any of it is read.
    if (request.content_length or 0) > limit[0]:
        raise _too_large(limit)
    return None


async def _read(request: web.Request, limit: Limit) -> bytes:
    """:func:`_gather` as bytes (for a control request's body: one copy of at most 1 MiB)."""
    raw = await _gather(request, limit)
    return raw if isinstance(raw, bytes) else bytes(raw)


async def _gather(request: web.Request, limit: Limit) -> bytes | bytearray:
    """The request's body within ``limit``: checked before anything is read when the body
    says its length, else as it arrives (:func:`~controller.edge.bodies.receive`)."""
    raw = _arrived(request, limit)
    if raw is not None:
        return raw
    return await receive(request, limit)


@attrs.frozen
class Limits:
    """The body limits of the two kinds of endpoint, in bytes (the config's defaults)."""

    control: int = 1024 * 1024
    body: int = 64 * 1024 * 1024
    #: model names one registration may carry
    models: int = 1024


class _Handlers:
    def __init__(
        self,
        registry: Registry,
        router: Router,
        relay: Relay,
        prober: Prober,
        limits: Limits,
        bodies: BodyReader,
    ) -> None:
        #: the body limit of the control endpoints, and of generations and worker calls
        self.limit: Limit = (limits.control, "max_control_body_size")
        self.body_limit: Limit = (limits.body, "max_body_size")
        self.max_models = limits.models
        self.registry = registry
        self.router = router
        self.relay = relay
        self.prober = prober
        self.bodies = bodies
        self.registrations = Pacer(REGISTRATIONS_PER_TURN, Allowance(REGISTRATIONS_PER_TURN))

    async def _read_json(self, request: web.Request, fields: Fields) -> Any:
        """The fields of a control request's body (:func:`controller.jsonbody.read`)."""
        raw = await _read(request, self.limit)
        return await self.bodies.read_async(raw, fields, self.max_models)

    async def register_worker(self, request: web.Request) -> web.StreamResponse:
        await self.registrations.turn()
        parsed = protocol.parse_register(
            await self._read_json(request, protocol.REGISTER), self.max_models
        )
        # The address this registration arrived on is the controller's own, whatever
        # the host application listens on.
        here = request.transport.get_extra_info("sockname") if request.transport else None
        own = [(str(here[0]), int(here[1]))] if isinstance(here, tuple) else []
        await self.prober.check_address(parsed.worker_name, own)
        caller = request[CALLER]
        source = caller.source if caller.source is not None else source_of(request)
        await self.prober.register(parsed, caller.owner, caller.admin, source)
        return _json(protocol.NULL)

    async def unregister_worker(self, request: web.Request) -> web.StreamResponse:
        name = protocol.parse_worker_name(await self._read_json(request, protocol.WORKER_NAME))
        caller = request[CALLER]
        removed = await self.prober.unregister(name, caller.owner, caller.admin)
        return _json(protocol.encode({"removed": removed}))

    async def refresh_all_workers(self, request: web.Request) -> web.StreamResponse:
        await _read(request, self.limit)
        await self.prober.refresh_all_workers()
        return _json(protocol.NULL)

    # The listings take no body but read it anyway, so the body size limit (413) holds on
    # every endpoint alike.

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        await _read(request, self.limit)
        return self._models(None)

    async def list_multimodal_models(self, request: web.Request) -> web.StreamResponse:
        await _read(request, self.limit)
        return self._models(True)

    async def list_language_models(self, request: web.Request) -> web.StreamResponse:
        await _read(request, self.limit)
        return self._models(False)

    def _models(self, multimodal: bool | None) -> web.Response:
        return _json(protocol.encode({"models": self.registry.model_names(multimodal)}))

    async def get_worker_address(self, request: web.Request) -> web.StreamResponse:
        # The busiest route: no coroutine frame but its own for a body that has arrived
        # (nearly all: a few dozen bytes, with the head), nor for decoding a usual one.
        raw = _arrived(request, self.limit)
        if raw is None:
            raw = await _read(request, self.limit)
        usual = read_as(raw, protocol.USUAL_DISPATCH)
        if usual is not None:
            model, affinity = usual.model, None
        else:
            try:
                if len(raw) <= INLINE:
                    data = self.bodies.read(raw, protocol.DISPATCH)
                else:
                    data = await self.bodies.read_async(raw, protocol.DISPATCH)
                model, affinity = protocol.parse_dispatch(data)
            except BadRequestError as e:
                return _bad_request(e)
        worker = self.router.dispatch(model, by_address=True, affinity=affinity)
        body = worker.address_body if worker else _NO_ADDRESS
        return web.Response(body=body, headers=_JSON_HEADERS)

    async def receive_heart_beat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request, protocol.HEARTBEAT)
            name, queue_length = protocol.parse_heartbeat(body)
        except BadRequestError as e:
            return _bad_request(e)
        caller = request[CALLER]
        exist = self.registry.heartbeat(name, queue_length, owner=caller.owner, admin=caller.admin)
        if not exist:
            log.debug(
                "Heartbeat for %s not applied: unknown, expired or another source", brief(name)
            )
        return _json(b'{"exist": true}' if exist else b'{"exist": false}')

    async def _relayable(
        self, request: web.Request
    ) -> tuple[bytes | bytearray, str, str | None] | web.Response:
        """The body, model and affinity key of a request to relay, or what to answer
        instead: 508 Loop Detected for a request this controller relayed before (or one
        that passed through too many proxies), before anything is read or relayed; 400
        for a body that names no model."""
        reason = self.relay.via.loop(request.headers)
        if reason is not None:
            log.debug("Refused a request to %s: %s", request.path, reason)
            body = {"error": "loop_detected", "field": None, "message": reason}
            return _json(protocol.encode(body), status=508)
        raw = await _gather(request, self.body_limit)
        try:
            data = await self.bodies.read_async(raw, protocol.DISPATCH)
            model, affinity = protocol.parse_dispatch(data)
        except BadRequestError as e:
            return _bad_request(e)
        return raw, model, affinity

    async def worker_generate_stream(self, request: web.Request) -> web.StreamResponse:
        started = self.registry.clock()  # the stream's time to first message counts from here
        relayable = await self._relayable(request)
        if isinstance(relayable, web.Response):
            return relayable
        body, model, affinity = relayable
        return await self.relay.generate_stream(request, body, model, affinity, started)

    def forwarder(self, path: str, *, count: bool) -> Handler:
        """A handler relaying a worker endpoint answered by one JSON document."""

        async def forward(request: web.Request) -> web.StreamResponse:
            relayable = await self._relayable(request)
            if isinstance(relayable, web.Response):
                return relayable
            body, model, affinity = relayable
            return await self.relay.forward(
                request, path, body, model, count=count, affinity=affinity
            )

        return forward

    async def worker_get_status(self, request: web.Request) -> web.StreamResponse:
        await _read(request, self.limit)
        return _json(protocol.status_body(await self.prober.aggregate_status()))

    async def test_connection(self, request: web.Request) -> web.StreamResponse:
        return _json(protocol.SUCCESS)

    async def dispatch_decisions(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("n", "20")
        # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            error = BadRequestError("n", f"must be a whole number, got {raw!r}")
            return _bad_request(error)
        decisions = self.router.recent_decisions(int(raw))
        return _json(protocol.encode({"decisions": decisions}))


def add_routes(
    app: web.Application,
    *,
    registry: Registry,
    router: Router,
    relay: Relay,
    prober: Prober,
    access: Access | None = None,
    limits: Limits | None = None,
    metrics: Metrics | None = None,
    bodies: BodyReader | None = None,
    tagged: bool = True,
) -> None:
    """Add every route of the wire protocol to ``app`` (and ``GET /metrics`` given
    ``metrics``), each behind the access check for its role (open to all unless ``access``
    says otherwise); ``bodies`` reads the request bodies (a reader of its own unless
    given). ``tagged`` gives each route's requests their ids (see
    :mod:`~controller.edge.request_ids`; off when the connection layer does it)."""
    h = _Handlers(registry, router, relay, prober, limits or Limits(), bodies or BodyReader())
    gate = Gate(access if access is not None else Access())
    posts: dict[str, Handler] = {
        "/register_worker": _owned(h.register_worker),
        "/unregister_worker": _owned(h.unregister_worker),
        "/refresh_all_workers": h.refresh_all_workers,
        "/list_models": h.list_models,
        "/list_multimodal_models": h.list_multimodal_models,
        "/list_language_models": h.list_language_models,
        "/get_worker_address": h.get_worker_address,
        "/receive_heart_beat": _owned(h.receive_heart_beat),
        "/worker_generate_stream": h.worker_generate_stream,
        "/worker_get_status": h.worker_get_status,
        # The rest of a worker's API, so clients given this controller's address as a
        # worker's (by a parent controller) work through it. Generation and embeddings
        # occupy a worker; the others are quick look-ups that do not.
        "/worker_generate": h.forwarder("/worker_generate", count=True),
        "/worker_get_embeddings": h.forwarder("/worker_get_embeddings", count=True),
        "/worker_get_conv_template": h.forwarder("/worker_get_conv_template", count=False),
        "/model_details": h.forwarder("/model_details", count=False),
        "/count_token": h.forwarder("/count_token", count=False),
    }
    gets: dict[str, Handler] = {
        "/test_connection": h.test_connection,
        "/dispatch_decisions": h.dispatch_decisions,
        # The operator's view: /status, /api/workers, /api/models (the client role).
        **StatusRoutes(router).routes(),
    }
    if metrics is not None:
        gets["/metrics"] = metrics.handle
    # The request's id first: the access check's refusals are logged and answered with it.
    tag = with_request_id if tagged else _untagged
    routes = [web.post(p, tag(gate.guard(p, h))) for p, h in posts.items()]
    routes += [web.get(p, tag(gate.guard(p, h)), allow_head=False) for p, h in gets.items()]
    app.add_routes(routes)


def _untagged(handler: Handler) -> Handler:
    return handler
