"""The worker address policy on resolved addresses: which addresses the controller may
open a connection to.

A worker's name is judged by what it resolves to, never by how it is spelled
(``0x7f000001``, ``2130706433``, ``127.1`` and ``localhost`` are all 127.0.0.1), and again
on the address of every connection the controller opens, so a name that resolves to an
allowed address at registration and to another one later (DNS rebinding) gets nowhere:
the relay's own connections ask :meth:`AddressGuard.admit`, the aiohttp session's
connections go through :meth:`AddressGuard.socket_factory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

from ..credentials import IPAddress, IPNetwork

__all__ = ["AddressGuard", "RefusedAddress", "is_ip_literal"]

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class RefusedAddress(OSError):
    """A worker's address the policy refuses; the message names the rule."""


def _ip(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_local(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host: binding to it succeeds only then (a
    system call, no traffic), which is what a wildcard listener accepts connections on."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


@attrs.define
class AddressGuard:
    """``networks`` (``--worker-networks``): when given, every worker address must fall
    inside one; otherwise any address but link-local ones. Unspecified, multicast and
    broadcast addresses are never allowed, nor the controller's own endpoints (``own``:
    listening address and port pairs, added once they are known; a wildcard address
    stands for every address of this host)."""

    networks: tuple[IPNetwork, ...] = ()
    own: list[tuple[IPAddress, int]] = attrs.field(factory=list)

    def add_own(self, sockets: Iterable[object]) -> None:
        """Add listening sockets' addresses (``(host, port, ...)`` tuples as aiohttp's
        ``runner.addresses`` gives them; others are skipped)."""
        for name in sockets:
            if isinstance(name, tuple) and len(name) >= 2:
                endpoint = (_ip(str(name[0])), int(name[1]))
                if endpoint not in self.own:
                    self.own.append(endpoint)

    def refusal(
        self, address: str, port: int, also_own: Iterable[tuple[str, int]] = ()
    ) -> str | None:
        """Why the controller may not connect to ``address``:``port``, or ``None``."""
        try:
            ip = _ip(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST:
            return f"{ip} is an unspecified, multicast or broadcast address"
        if self.networks:
            if not any(ip.version == n.version and ip in n for n in self.networks):
                return f"{ip} is outside --worker-networks"
        elif ip.is_link_local:
            return f"{ip} is link-local (cloud metadata services live there)"
        own = [*self.own, *((_ip(h), p) for h, p in also_own)]
        for own_ip, own_port in own:
            wildcard = own_ip.is_unspecified and own_ip.version == ip.version
            if port == own_port and (ip == own_ip or (wildcard and _is_local(ip))):
                return f"{ip} port {port} is this controller's own address"
        return None

    def admit(self, addresses: list[str], port: int) -> list[str]:
        """The addresses among ``addresses`` the controller may connect to;
        :class:`RefusedAddress` when there is none."""
        allowed = [a for a in addresses if self.refusal(a, port) is None]
        if not allowed:
            reasons = "; ".join(r for a in addresses if (r := self.refusal(a, port)))
            raise RefusedAddress(f"worker address refused: {reasons or 'no address'}")
        return allowed

    async def check_worker(
        self,
        worker_name: str,
        also_own: Iterable[tuple[str, int]] = (),
        advertised: str | None = None,
    ) -> list[str]:
        """Check a registration's worker name: every address it resolves to must be
        allowed, and none may be this controller's (``also_own``: the address the
        registration arrived on, say; ``advertised``: the URL a parent reaches it at).
        :class:`RefusedAddress` naming the first rule broken."""
        host, port = _host_port(worker_name)
        own = list(also_own)
        if advertised is not None:
            if _host_port(advertised) == (host, port):
                raise RefusedAddress("it is this controller's advertised address")
            advertised_host, advertised_port = _host_port(advertised)
            with contextlib.suppress(OSError):
                found = await _lookup(advertised_host, advertised_port)
                own += [(address, advertised_port) for address in found]
        return await self.resolve(host, port, own)

    async def resolve(
        self, host: str, port: int, also_own: Iterable[tuple[str, int]] = ()
    ) -> list[str]:
        """Resolve ``host`` and check every address it has (a registration: all must
        pass); :class:`RefusedAddress` naming the first that does not."""
        try:
            addresses = await _lookup(host, port)
        except OSError as e:
            raise RefusedAddress(f"{host!r} does not resolve: {e}") from None
        own = list(also_own)
        for address in addresses:
            reason = self.refusal(address, port, own)
            if reason is not None:
                raise RefusedAddress(f"{host!r} resolves to {reason}")
        return addresses

    def socket_factory(
        self, addr_info: tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int]]
    ) -> socket.socket:
        """aiohttp's ``socket_factory``: refuses a connection to an address the policy
        does not allow, whatever name resolved to it."""
        family, type_, proto, _, sockaddr = addr_info
        reason = self.refusal(str(sockaddr[0]), int(sockaddr[1]))
        if reason is not None:
            raise RefusedAddress(f"worker address refused: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address written out in full (``127.0.0.1``, ``::1``), which
    needs no resolver; short forms such as ``127.1`` are left to the resolver."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


async def _lookup(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to; a literal one as it is, without the resolver
    (which runs in a thread: a registration of ``http://10.0.0.7:21002`` needs no thread)."""
    if is_ip_literal(host):
        return [host]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
