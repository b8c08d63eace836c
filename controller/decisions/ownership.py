"""Who may change a registration: the rule, as a pure function of the entry's owner and
the caller's.

A registration belongs to whoever made it (see :class:`~controller.decisions.models.Owner`).
The owner itself may do anything with it, and so may an admin. Anyone else:

* if a token's principal owns it: nothing (403);
* if a host owns it (it was made without a token): a heartbeat is not applied (the answer
  ``exist: false`` makes a stock worker whose address changed register again), an
  unregistration is refused, and a registration takes it over (a stock worker restarted
  elsewhere must be able to come back; FastChat's worker crashes on a refusal).

An entry without an owner (restored from an older state file, or registered by code in
this process) belongs to nobody yet: anyone may act on it, and the next registration
claims it.
"""

from __future__ import annotations

import enum

from .models import Owner

__all__ = ["Standing", "standing"]


class Standing(enum.Enum):
    """Where a caller stands towards one registration."""

    #: the owner, an admin, or nobody owns it: the caller may change it
    OWNER = "owner"
    #: a host owns it and the caller is another source: heartbeats are not applied,
    #: unregistrations are refused, a registration takes it over
    OTHER_SOURCE = "other source"
    #: a principal owns it and the caller is someone else: refused
    FORBIDDEN = "forbidden"


def standing(current: Owner | None, caller: Owner | None, admin: bool = False) -> Standing:
    """Where ``caller`` stands towards a registration owned by ``current``."""
    if admin or caller is None or current is None or current == caller:
        return Standing.OWNER
    if current.principal is None:
        return Standing.OTHER_SOURCE
    return Standing.FORBIDDEN
