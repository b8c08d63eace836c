"""Values the decisions are made of: what a worker says, what it registered as, the
dispatch methods and the in-band error codes. Immutable, no behaviour beyond parsing."""

from __future__ import annotations

import enum

import attrs

__all__ = ["DispatchMethod", "ErrorProfile", "Owner", "WorkerInfo", "WorkerStatus"]


class DispatchMethod(enum.Enum):
    """How ``/get_worker_address`` picks among the workers serving a model."""

    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"
    LEAST_TIME = "least_time"
    POWER_OF_TWO = "power_of_two"

    @classmethod
    def from_str(cls, name: str) -> DispatchMethod:
        """Parse FastChat's spelling (``shortest_queue`` or ``lottery``)."""
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown dispatch method {name!r}; choose one of {choices}") from None


@attrs.frozen
class ErrorProfile:
    """The in-band error codes a deployment's clients understand.

    FastChat's clients know 50005/50006; TinyChat's know 2 (no worker) and 3 (worker error).
    """

    no_worker: int = 50005
    worker_error: int = 50006

    @classmethod
    def fastchat(cls) -> ErrorProfile:
        return cls(50005, 50006)

    @classmethod
    def tinychat(cls) -> ErrorProfile:
        return cls(2, 3)


@attrs.frozen
class WorkerStatus:
    """What a worker says about itself in a registration or a ``/worker_get_status`` answer."""

    model_names: tuple[str, ...]
    speed: float
    queue_length: int


@attrs.frozen
class WorkerInfo:
    """What a worker registered as: its address, what it serves and how it is kept alive.

    A new registration (or a refresh that finds the worker serving something else) makes a
    new value; the registry entry that holds it (:class:`~controller.decisions.registry.Worker`)
    keeps its identity, its load estimate and its health across such changes.
    """

    name: str
    model_names: tuple[str, ...]
    speed: float
    check_heart_beat: bool
    multimodal: bool = False

    @classmethod
    def from_status(
        cls, name: str, status: WorkerStatus, *, check_heart_beat: bool, multimodal: bool
    ) -> WorkerInfo:
        return cls(name, status.model_names, status.speed, check_heart_beat, multimodal)


@attrs.frozen
class Owner:
    """Who a registration belongs to: the principal of the token that made it, or, for one
    made without a token, the host it came from (as ``credentials.host_identity`` names it).

    Exactly one of the two is set. A principal's claim is strong (only it or an admin may
    change the registration); a host's is weak (another host may take the worker over by
    registering it again, as a stock worker restarted elsewhere must).
    """

    principal: str | None = None
    host: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.principal is None) == (self.host is None):
            raise ValueError(f"an Owner is a principal or a host, got {self!r}")

    def __str__(self) -> str:
        return f"principal {self.principal}" if self.principal is not None else f"host {self.host}"
