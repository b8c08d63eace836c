"""The controller's exceptions: small, specific, and each tells the reader what went wrong."""

from __future__ import annotations

import traceback

__all__ = [
    "BadRequestError",
    "BodyTimeoutError",
    "ConfigError",
    "ControllerError",
    "ForbiddenError",
    "NotRunningError",
    "RegistryFullError",
    "release",
]


class ControllerError(Exception):
    """Base class of every error raised by fc-controller."""


class ConfigError(ControllerError, ValueError):
    """A configuration value is invalid; the message names the setting and the value."""


class NotRunningError(ControllerError, RuntimeError):
    """An operation needs a running controller (call ``start()`` or ``serve()`` first)."""


class BadRequestError(ControllerError):
    """A request body does not follow the wire contract.

    Handlers answer it with HTTP 400 and a JSON body naming ``field`` and ``problem``;
    nothing in the registry has changed when it is raised.
    """

    def __init__(self, field: str | None, problem: str) -> None:
        self.field = field
        self.problem = problem
        where = f"{field}: " if field else ""
        super().__init__(f"{where}{problem}")


class ForbiddenError(ControllerError):
    """The caller may not change this registration: someone else owns it.

    Handlers answer it with HTTP 403; nothing in the registry has changed when it is
    raised.
    """

    def __init__(self, worker_name: str) -> None:
        self.worker_name = worker_name
        super().__init__(
            f"worker {worker_name!r} is registered by someone else: only the token it was "
            "registered with, or an admin token, may change it"
        )


class RegistryFullError(ControllerError):
    """A new registration would pass ``--max-workers`` or ``--max-workers-per-source``.

    Handlers answer it with HTTP 503 and ``Retry-After``; nothing has changed.
    """

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class BodyTimeoutError(ControllerError, TimeoutError):
    """A request body did not arrive whole within ``--body-timeout``.

    Raised from the request's body stream to whatever is reading it; handlers answer HTTP
    408 and the connection is closed. A ``TimeoutError``, so aiohttp's lingering read of an
    unread body stops on it quietly.
    """


def release(error: BaseException) -> None:
    """Clear the finished frames in ``error``'s traceback and in those of the errors it
    came from, so that all of it is freed as soon as ``error`` is dropped. A caught client
    error otherwise sits in reference cycles with its frames (about 80 objects per failed
    status probe) that only a full garbage collection frees: a dead fleet probed again and
    again fills the heap those collections walk."""
    seen: BaseException | None = error
    for _ in range(16):  # a chain is short; a cycle of causes must not loop forever
        if seen is None:
            return
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__
