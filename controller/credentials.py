"""Who may talk to the controller: the roles, their tokens and their trusted networks.

Values only, read once at start-up (``controller.access_flags`` reads the files and the
environment) and consulted by the edge (``controller.edge.access``) on every request.

Tokens are never kept: a :class:`TokenTable` holds a BLAKE2s digest of each and the
principal it belongs to, and compares a presented token's digest with every entry in
constant time (``hmac.compare_digest``), so neither a log line, a ``repr`` nor a timing
difference gives a token away.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

import attrs

from .errors import ConfigError
from .worker.tokens import parse_token_line

__all__ = [
    "Access",
    "IPNetwork",
    "Role",
    "TokenTable",
    "digest",
    "host_identity",
    "parse_networks",
    "peer_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


class Role(enum.Enum):
    """Who an endpoint is for (see docs/security.md for which endpoint needs which)."""

    WORKER = "worker"
    CLIENT = "client"
    ADMIN = "admin"


def digest(token: str) -> bytes:
    """What tables compare: a token's BLAKE2s digest (the tokens themselves are never
    kept). BLAKE2s rather than SHA-256: Python's own implementation, a third cheaper per
    request than OpenSSL's SHA-256 through its provider lookup."""
    return hashlib.blake2s(token.encode()).digest()


def bare_principal(token: str) -> str:
    """The principal of a token given without a name: a short hash of it, which names it
    in logs without giving it away."""
    return "token-" + hashlib.sha256(b"fc-controller principal\0" + token.encode()).hexdigest()[:12]


@attrs.frozen(repr=False)
class TokenTable:
    """The tokens of one role, each with its principal (several tokens may share one
    principal: that is how a token is rotated without losing ownership)."""

    _entries: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str) -> TokenTable:
        """Parse a token file's lines; ``ConfigError`` naming ``source`` and the line."""
        entries: list[tuple[str, bytes]] = []
        seen: dict[bytes, str] = {}
        for number, line in enumerate(lines, 1):
            where = f"{source}, line {number}"
            try:
                parsed = parse_token_line(line, where)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if parsed is None:
                continue
            name, token = parsed
            hashed = digest(token)
            if hashed in seen:
                raise ConfigError(f"{where}: this token is already on {seen[hashed]}")
            seen[hashed] = where
            entries.append((name or bare_principal(token), hashed))
        return cls(tuple(entries))

    @classmethod
    def from_env(cls, value: str, name: str) -> TokenTable:
        """Parse a comma-separated list of tokens (``NAME:TOKEN`` or ``TOKEN``)."""
        return cls.from_lines(value.split(","), f"environment variable {name}, item")

    def principal_of(self, token: str) -> str | None:
        """The principal holding ``token``, or ``None``; takes the same time whichever
        entry (if any) matches."""
        hashed = digest(token)
        found: str | None = None
        for principal, candidate in self._entries:
            if hmac.compare_digest(candidate, hashed):
                found = principal
        return found

    @property
    def entries(self) -> tuple[tuple[str, bytes], ...]:
        """Each token's principal and digest (the tokens themselves are not kept)."""
        return self._entries

    @property
    def principals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p, _ in self._entries))

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable(principals={list(self.principals)!r})"


def parse_networks(values: Iterable[str], source: str) -> tuple[IPNetwork, ...]:
    """Parse CIDR blocks such as ``10.0.0.0/8`` or ``fd00::/8`` (a lone address is a
    block of one); ``ConfigError`` naming ``source`` for anything else."""
    networks: list[IPNetwork] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(
                f"{source}: expected a network such as 10.0.0.0/8 or fd00::/8, got {text!r}"
            ) from None
        networks.append(network)
    return tuple(networks)


def peer_address(host: object) -> IPAddress | None:
    """The TCP peer's address as the socket reports it, IPv4-mapped IPv6 unwrapped;
    ``None`` when it is no IP address (a Unix socket)."""
    if not isinstance(host, str) or not host:
        return None
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_identity(address: IPAddress | None) -> str:
    """How ownership names a source host: its address, except that ``::1`` and
    ``127.0.0.1`` are one host (a worker reaching ``localhost`` may use either)."""
    if address is None:
        return "local"
    if address == _LOOPBACK_V6:
        address = _LOOPBACK_V4
    return str(address)


@attrs.frozen(kw_only=True)
class Access:
    """Each role's tokens and the networks trusted to act in it without one.

    A role with neither stays open, as in FastChat. The admin role has no trusted
    networks: its power (overriding ownership, the decision log) needs a token.
    """

    worker_tokens: TokenTable = attrs.field(factory=TokenTable)
    client_tokens: TokenTable = attrs.field(factory=TokenTable)
    admin_tokens: TokenTable = attrs.field(factory=TokenTable)
    trust_workers_from: tuple[IPNetwork, ...] = ()
    trust_clients_from: tuple[IPNetwork, ...] = ()

    def tokens(self, role: Role) -> TokenTable:
        if role is Role.WORKER:
            return self.worker_tokens
        if role is Role.CLIENT:
            return self.client_tokens
        return self.admin_tokens

    def trusted_networks(self, role: Role) -> tuple[IPNetwork, ...]:
        if role is Role.WORKER:
            return self.trust_workers_from
        if role is Role.CLIENT:
            return self.trust_clients_from
        return ()

    def is_open(self, role: Role) -> bool:
        """Nothing closes ``role``: anyone who reaches the port may act in it."""
        return not self.tokens(role) and not self.trusted_networks(role)

    def trusts(self, role: Role, address: IPAddress | None) -> bool:
        return address is not None and any(
            address in network for network in self.trusted_networks(role)
        )

    @property
    def has_tokens(self) -> bool:
        return bool(self.worker_tokens or self.client_tokens or self.admin_tokens)

    @property
    def everything_open(self) -> bool:
        return not self.has_tokens and not self.trust_workers_from and not self.trust_clients_from
