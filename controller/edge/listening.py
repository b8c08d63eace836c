"""What the standalone controller's listening socket needs before it opens: its TLS
context, connection caps that fit the descriptor limit, and the report of their refusals."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from typing import Any

import attrs

from .. import protocol
from ..config import ControllerConfig

__all__ = [
    "REPORT_EVERY",
    "RETRY_AFTER",
    "Caps",
    "ClientLimits",
    "LimitsReport",
    "fit_to_descriptors",
    "listening_url",
    "refusal",
    "refusals",
    "server_ssl_context",
    "soft_descriptor_limit",
]

# The report moved here from client_connections.py; its logger keeps that name, which
# operators filter on.
log = logging.getLogger("controller.edge.client_connections")

#: descriptors kept for the listening socket, the state file, logs and DNS
SPARE_DESCRIPTORS = 64
#: refusals and evictions are summed up in one WARNING at most this often (seconds)
REPORT_EVERY = 10.0


def soft_descriptor_limit() -> int | None:
    """This process's soft limit on open descriptors; ``None`` if unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


@attrs.frozen
class Caps:
    """The connection caps the controller runs with, and why they differ from the
    configured ones (``warning``), if they do."""

    max_connections: int
    max_worker_connections: int
    warning: str | None = None


def fit_to_descriptors(max_connections: int, max_worker_connections: int, soft: int | None) -> Caps:
    """The caps, shrunk in proportion when the descriptor limit ``soft`` cannot hold them
    plus :data:`SPARE_DESCRIPTORS`: at a cap, idle clients are closed to make room, while
    at the descriptor limit the kernel refuses new clients outright (1,100 idle sockets
    at a limit of 1,024 locked everyone out)."""
    needed = max_connections + max_worker_connections + SPARE_DESCRIPTORS
    if soft is None or soft >= needed:
        return Caps(max_connections, max_worker_connections)
    room = max(soft - SPARE_DESCRIPTORS, 3)
    clients = max(1, room * max_connections // (max_connections + max_worker_connections))
    workers = max(2, room - clients)
    warning = (
        f"The descriptor limit ({soft}) cannot hold --max-connections {max_connections} + "
        f"--max-worker-connections {max_worker_connections} + {SPARE_DESCRIPTORS}: running "
        f"with {clients} and {workers} instead, so that idle clients are closed to make room "
        "before the kernel refuses anyone. Raise the limit (ulimit -n) for the caps asked for"
    )
    return Caps(clients, workers, warning)


def server_ssl_context(config: ControllerConfig) -> ssl.SSLContext | None:
    """The listening socket's TLS context, or ``None`` for plain HTTP."""
    if config.ssl_certfile is None or config.ssl_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    if config.ssl_client_ca_certs is not None:
        # Mutual TLS: no certificate signed by this CA, no handshake.
        context.load_verify_locations(cafile=config.ssl_client_ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def listening_url(cfg: ControllerConfig, addresses: Iterable[Any]) -> str:
    """The base URL of a listener bound to ``addresses`` (the real port if 0 was asked)."""
    port = cfg.port
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            port = address[1]
            break
    host = cfg.host or "0.0.0.0"
    if ":" in host:
        host = f"[{host}]"
    return f"{cfg.scheme}://{host}:{port}"


#: what a refused connection is told to wait (seconds)
RETRY_AFTER = 1


@attrs.frozen
class ClientLimits:
    """The bounds on client connections (the config's ``header_timeout`` and so on)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_source: int = 256

    @classmethod
    def of(cls, config: ControllerConfig) -> ClientLimits:
        return cls(
            config.header_timeout,
            config.body_timeout,
            config.idle_timeout,
            config.max_connections,
            config.max_connections_per_source,
        )


def refusal(message: str) -> bytes:
    """The canned answer written to a connection refused as it opens: a 503 naming the
    limit, then a close."""
    body = protocol.encode({"error": "too_many_connections", "field": None, "message": message})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def refusals(limits: ClientLimits) -> tuple[bytes, bytes]:
    """The canned refusals at ``max_connections_per_source`` and at ``max_connections``."""
    return refusal(
        f"this address holds {limits.max_connections_per_source} connections already "
        "(max_connections_per_source)"
    ), refusal(
        f"the controller holds {limits.max_connections} connections, each with a request "
        "in progress (max_connections)"
    )


class LimitsReport:
    """Counts refusals and evictions at the connection caps, and says so now and then in
    one WARNING (never once per event: an attack would flood the log)."""

    def __init__(self, limits: ClientLimits) -> None:
        self._limits = limits
        self._events: dict[str, int] = {}
        self._report_at = 0.0

    def note(self, what: str, now: float, held: int) -> None:
        events = self._events
        events[what] = events.get(what, 0) + 1
        if now < self._report_at:
            return
        self._report_at = now + REPORT_EVERY
        self._events = {}
        limits = self._limits
        log.warning(
            "Client connections at their limits (%d held; --max-connections %d, "
            "--max-connections-per-source %d): %s",
            held,
            limits.max_connections,
            limits.max_connections_per_source,
            ", ".join(f"{n} {kind}" for kind, n in events.items()),
        )
