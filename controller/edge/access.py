"""Who is calling, and may they: the access check every route passes before any work.

Each route is wrapped by :meth:`Gate.guard` with the role it needs. The check runs before
the body is read: a refused request costs a header lookup and one hash. It decides on the
``Authorization: Bearer`` header and on the TCP peer address only (never on
``X-Forwarded-For`` or anything else a client writes), and leaves the caller's identity
on the request (:data:`CALLER`) for the handlers that record ownership (the worker
routes').

Missing credentials get 401 with ``WWW-Authenticate: Bearer``; a wrong token, or one of
another role, gets 403. The body names the role needed and never echoes the token.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from hmac import compare_digest
from typing import Any, TypeVar, cast

import attrs
from aiohttp import web
from aiohttp.hdrs import AUTHORIZATION

from .. import protocol
from ..config import ControllerConfig
from ..credentials import Access, Role, digest, host_identity, peer_address
from ..decisions.models import Owner

__all__ = [
    "CALLER",
    "ROUTE_ROLES",
    "Caller",
    "Gate",
    "Handler",
    "exposure_warnings",
    "route_role",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the role each route needs; ``None``: open to anyone. A route not listed needs the client
#: role. Add a route's entry here when it needs another role, or to say why it is client's.
ROUTE_ROLES: dict[str, Role | None] = {
    "/register_worker": Role.WORKER,
    "/receive_heart_beat": Role.WORKER,
    "/unregister_worker": Role.WORKER,
    # a liveness check: load balancers and scripts probe it without credentials
    "/test_connection": None,
    "/dispatch_decisions": Role.ADMIN,
    # What an operator reads is the client role's: Prometheus sends a bearer token (its
    # authorization setting), a browser comes from a --trust-clients-from network.
    "/metrics": Role.CLIENT,
}

_CHALLENGE = 'Bearer realm="fc-controller"'
_FLAGS = {
    Role.WORKER: "--worker-token-file (FC_CONTROLLER_WORKER_TOKENS) or --trust-workers-from",
    Role.CLIENT: "--api-token-file (FC_CONTROLLER_API_TOKENS) or --trust-clients-from",
    Role.ADMIN: "--admin-token-file (FC_CONTROLLER_ADMIN_TOKENS)",
}


@attrs.frozen
class Caller:
    """Who made a request: whom a registration it makes belongs to, and whether it holds
    an admin token (which may change registrations others own)."""

    owner: Owner
    admin: bool = False
    #: the host the request came from (``credentials.host_identity`` of the peer)
    source: str | None = None


_F = TypeVar("_F", bound=Callable[..., Any])

CALLER = web.RequestKey("fc_controller_caller", Caller)


def route_role(path: str) -> Role | None:
    """The role a route needs (``None``: open to anyone); see :data:`ROUTE_ROLES`."""
    return ROUTE_ROLES.get(path, Role.CLIENT)


class Gate:
    """Checks each request against the configured :class:`~controller.credentials.Access`."""

    def __init__(self, access: Access) -> None:
        self.access = access
        # Per role, every token that may act in it, digested, with the caller it makes: one
        # scan per request. Admin tokens come last, so an admin token listed in a role's
        # file too is taken as the admin's (the scan keeps the last match).
        callers: dict[tuple[str, bool], Caller] = {}
        for principal, _ in access.admin_tokens.entries:
            callers[principal, True] = Caller(Owner(principal=principal), admin=True)
        admins = tuple((d, callers[p, True]) for p, d in access.admin_tokens.entries)
        self._tables: dict[Role, tuple[tuple[bytes, Caller], ...]] = {Role.ADMIN: admins}
        for role in (Role.WORKER, Role.CLIENT):
            entries = access.tokens(role).entries
            for principal, _ in entries:
                callers.setdefault((principal, False), Caller(Owner(principal=principal)))
            self._tables[role] = tuple((d, callers[p, False]) for p, d in entries) + admins

    def guard(self, path: str, handler: Handler) -> Handler:
        """``handler`` behind the check for the role ``path`` needs."""
        role = route_role(path)
        if role is None:
            return handler
        if role is Role.ADMIN and not self.access.admin_tokens:
            # Without admin tokens nobody could pass: the route is as closed as the
            # client endpoints instead.
            role = Role.CLIENT
        if role is Role.CLIENT and self.access.everything_open:
            # Nothing to check and nobody's identity needed: FastChat's speed.
            return handler
        needed = role
        table = self._tables[role]
        identify = self._identify
        # Only the worker routes' handlers record who made a request (ownership).
        keep = role is Role.WORKER

        def guarded(request: web.Request) -> Awaitable[web.StreamResponse]:
            # A plain function handing aiohttp the handler's own coroutine (marked as a
            # coroutine function below): an async wrapper would add a frame to every
            # resumption of the handler, which cost more than the token check itself.
            header = request.headers.get(AUTHORIZATION)
            if header is not None and header.startswith("Bearer "):
                # The usual case with tokens on, inline: a valid token in the usual
                # spelling. Anything else goes through _identify's full rules.
                found = _match(table, digest(header[7:]))
                if found is not None:
                    if keep:
                        request[CALLER] = found
                    return handler(request)
            caller = identify(request, needed, table)
            if type(caller) is not Caller:
                return _answer(cast(web.Response, caller))
            if keep:
                request[CALLER] = caller
            return handler(request)

        return _coroutine_function(guarded)

    def identify(self, request: web.Request, role: Role) -> Caller | web.Response:
        """The caller, if it may act in ``role``; else the 401 or 403 to answer."""
        return self._identify(request, role, self._tables[role])

    def _identify(
        self, request: web.Request, role: Role, table: tuple[tuple[bytes, Caller], ...]
    ) -> Caller | web.Response:
        access = self.access
        token = _bearer(request)
        if token is not None:
            found = _match(table, digest(token))
            if found is not None:
                return found
        # Only now: a valid token (the common case with tokens on) needs no peer address.
        address = _peer(request)
        if access.is_open(role) and role is not Role.ADMIN:
            # An open role ignores tokens it does not know: a worker configured with a
            # token keeps working against a controller that asks for none.
            return _from_host(address)
        if token is not None and access.tokens(role):
            return _refuse(403, role, "this token is not valid for it")
        if access.trusts(role, address):
            return _from_host(address)
        if token is None:
            return _refuse(401, role, "send Authorization: Bearer TOKEN")
        return _refuse(403, role, "this token is not valid for it")


def _match(table: tuple[tuple[bytes, Caller], ...], hashed: bytes) -> Caller | None:
    """The caller whose token has digest ``hashed``, if one does. Every entry is compared,
    in constant time, whichever matches: no early exit."""
    found: Caller | None = None
    for candidate, caller in table:
        if compare_digest(candidate, hashed):
            found = caller
    return found


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get(AUTHORIZATION)
    if header is None:
        return None
    if header.startswith("Bearer ") and " " not in (token := header[7:]) and token:
        return token  # the usual spelling, read without splitting
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _peer(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # The socket's own peer, not request.remote: a host application's middleware may have
    # rewritten that from X-Forwarded-For.
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    host = peername[0] if isinstance(peername, tuple) and peername else None
    return peer_address(host)


def _refuse(status: int, role: Role, problem: str) -> web.Response:
    log.debug("refused a request for the %s role: HTTP %d", role.value, status)
    body = protocol.encode(
        {
            "error": "unauthorized" if status == 401 else "forbidden",
            "field": None,
            "role": role.value,
            "message": f"this endpoint needs the {role.value} role: {problem}",
        }
    )
    headers = {"WWW-Authenticate": _CHALLENGE} if status == 401 else None
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(config: ControllerConfig) -> list[str]:
    """What a controller listening on ``config.host`` leaves open to strangers: one line
    per open role, and one if tokens would travel in clear. Nothing on loopback."""
    if _is_loopback(config.host):
        return []
    where = f"{config.host or 'every interface'}:{config.port}"
    access = config.access
    warnings = [
        f"The {role.value} role is open: anyone who can reach {where} may "
        f"{'register, heartbeat and unregister workers' if role is Role.WORKER else 'use it'}; "
        f"close it with {_FLAGS[role]}"
        for role in (Role.WORKER, Role.CLIENT)
        if access.is_open(role)
    ]
    if access.has_tokens and config.ssl_certfile is None:
        warnings.append(
            f"Tokens travel in clear: listening on {where} without TLS; "
            "give --ssl-certfile and --ssl-keyfile (or --ssl)"
        )
    return warnings


def _from_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Caller:
    host = host_identity(address)
    return Caller(Owner(host=host), source=host)


def source_of(request: web.Request) -> str:
    """The host ``request`` came from, as ownership and the per-source limits name it."""
    return host_identity(_peer(request))


async def _answer(response: web.Response) -> web.StreamResponse:
    return response


def _coroutine_function(func: _F) -> _F:
    """Mark ``func`` (which returns a coroutine) as a coroutine function for aiohttp's
    route check: ``inspect.markcoroutinefunction`` from Python 3.12, asyncio's own marker
    (what ``asyncio.iscoroutinefunction`` looks for) before."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        return cast(_F, mark(func))
    func._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return func
