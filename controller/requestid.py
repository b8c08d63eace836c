"""The request id: which request a log line, a relayed call and an answer belong to.

Every request the controller serves gets one: the client's ``X-Request-Id`` when it is
1 to 128 letters, digits, ``.``, ``_`` and ``-``, else a fresh one. It lives in a context
variable for the request's task (aiohttp runs each request in a task of its own, so it
never leaks into the next request on the connection), whence the relay passes it on to the
worker, the answer echoes it, and :class:`RequestIdFilter` puts it into log records.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from collections.abc import Callable
from contextvars import ContextVar

from multidict import istr

__all__ = ["HEADER", "REQUEST_ID", "RequestIdFilter", "accept", "fresh"]

#: the header's name, made case-insensitive once (a plain str key costs a conversion on
#: every lookup in aiohttp's headers)
HEADER = istr("X-Request-Id")
#: the id of the request the current task serves (``None`` outside a request)
REQUEST_ID: ContextVar[str | None] = ContextVar("fc_controller_request_id", default=None)

_VALID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Fresh ids are this process's random prefix and a counter: unique across restarts and
# replicas, and cheaper than a uuid4 (no system call per request).
_PREFIX = secrets.token_hex(6) + "-"

#: a new id no other request of any controller is likely to carry (a call runs no Python
#: frame: the next of a C iterator formatting a C counter)
fresh: Callable[[], str] = map((_PREFIX + "{:x}").format, itertools.count(1)).__next__


def accept(value: str | None) -> str:
    """The client's id if it is acceptable, else a fresh one."""
    if value is not None and _VALID.fullmatch(value) is not None:
        return value
    return fresh()


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the id of the request being served, or to
    ``missing`` outside one, for formatters to show (``%(request_id)s``); add it to a log
    handler."""

    def __init__(self, missing: str | None = None) -> None:
        super().__init__()
        self.missing = missing

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or self.missing
        return True
