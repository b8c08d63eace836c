"""Where a worker's endpoint is: its address parsed once, and its host name resolved."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

from .guard import AddressGuard, is_ip_literal

__all__ = ["DNS_TTL", "Target", "parse_target"]

#: how long a resolved host name is reused
DNS_TTL = 10.0


class Target:
    """Where a worker's stream endpoint is: parsed once per worker name."""

    __slots__ = (
        "_addresses",
        "_resolved_at",
        "guard",
        "host",
        "host_header",
        "key",
        "path",
        "port",
        "ssl",
    )

    def __init__(
        self,
        host: str,
        port: int,
        tls: bool,
        path: str,
        host_header: str,
        guard: AddressGuard | None = None,
    ) -> None:
        self.host, self.port, self.ssl, self.path = host, port, tls, path
        self.host_header = host_header
        #: connections to the same address are shared between workers' names and paths
        self.key = (host, port, tls)
        #: the worker address policy every address is checked against before it is used
        self.guard = guard if guard is not None else AddressGuard()
        self._addresses: list[str] = []
        self._resolved_at = -DNS_TTL

    def request_head(self, body_length: int, extra: bytes = b"") -> bytes:
        """The request's head; ``extra`` is whole header lines (each ending in CRLF) to
        add, such as the upstream token's ``Authorization``."""
        return (
            (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {body_length}\r\n"
            ).encode("latin-1")
            + extra
            + b"\r\n"
        )

    async def addresses(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """The host's addresses the worker address policy allows, resolved off the loop and
        cached for ``DNS_TTL`` seconds; :class:`~controller.relay.guard.RefusedAddress`
        (an ``OSError``) when it allows none, however the name resolved this time."""
        if self._addresses and time.monotonic() - self._resolved_at <= DNS_TTL:
            return self._addresses
        now = time.monotonic()
        if is_ip_literal(self.host):
            found = [self.host]
        else:
            infos = await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            found = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))
        self._addresses, self._resolved_at = self.guard.admit(found, self.port), now
        return self._addresses


def parse_target(worker_name: str, path: str, guard: AddressGuard | None = None) -> Target | None:
    """The :class:`Target` for ``path`` on a worker, or ``None`` if its name is no URL."""
    try:
        parts = urlsplit(worker_name.rstrip("/"))
        tls = parts.scheme == "https"
        if (tls or parts.scheme == "http") and parts.hostname:
            port = parts.port or (443 if tls else 80)
            target = Target(parts.hostname, port, tls, parts.path + path, parts.netloc, guard)
            target.request_head(0)  # a name HTTP/1.1 cannot carry (a path with '€') fails here
            return target
    except ValueError:  # a port out of range, say, or a UnicodeEncodeError
        pass
    return None
