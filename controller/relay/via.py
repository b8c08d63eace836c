"""Loop detection: the ``Via`` entry every relayed request carries.

Each controller names itself with a random id when it starts. A request that already
passed through this controller (its id in ``Via``), or through more than ``MAX_HOPS``
proxies, is refused with HTTP 508 before anything is relayed, so two controllers
registered at each other stop at the first repeat instead of exhausting file descriptors.
"""

from __future__ import annotations

import secrets

import attrs
from multidict import CIMultiDictProxy

__all__ = ["MAX_HOPS", "Via"]

#: a request that has passed through more proxies than this is refused (508)
MAX_HOPS = 8


def _entries(headers: CIMultiDictProxy[str]) -> list[str]:
    values = headers.getall("Via", [])
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


@attrs.frozen
class Via:
    """This controller's ``Via`` entry, ``1.1 fc-<random hex>``."""

    instance: str = attrs.field(factory=lambda: f"fc-{secrets.token_hex(8)}")

    @property
    def entry(self) -> str:
        return f"1.1 {self.instance}"

    def loop(self, headers: CIMultiDictProxy[str]) -> str | None:
        """Why a request with these headers must not be relayed (a loop), or ``None``."""
        entries = _entries(headers)
        if any(entry.split()[1:2] == [self.instance] for entry in entries):
            return f"the request already passed through this controller ({self.instance})"
        if len(entries) > MAX_HOPS:
            return f"the request passed through {len(entries)} proxies (at most {MAX_HOPS})"
        return None

    def head(self, headers: CIMultiDictProxy[str] | None) -> bytes:
        """The ``Via`` header line (ending in CRLF) for relaying a request with these
        headers: the entries it came with, then this controller's."""
        entries = [*(_entries(headers) if headers is not None else []), self.entry]
        # Header values arrive decoded as UTF-8 with surrogate escapes: back to their bytes.
        return b"Via: " + ", ".join(entries).encode("utf-8", "surrogateescape") + b"\r\n"
