"""Value types shared by the registry, the dispatcher and the wire protocol."""

from __future__ import annotations

import enum

import attrs

__all__ = ["DispatchMethod", "ErrorProfile", "WorkerInfo", "WorkerStatus"]


class DispatchMethod(enum.Enum):
    """How ``/get_worker_address`` picks among the workers serving a model."""

    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"

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


@attrs.define(eq=False, slots=True)
class WorkerInfo:
    """One registered worker and the controller's view of its load.

    ``queue_length`` is the number the dispatcher uses: what the worker last reported, plus
    what was dispatched to it since that report, minus the streams this controller relayed
    to it that have ended since (never below zero). It is kept up to date on each event, so
    reading it costs nothing; the per-report counters beside it say how it was reached.
    """

    name: str
    model_names: tuple[str, ...]
    speed: float
    check_heart_beat: bool
    multimodal: bool
    last_heart_beat: float
    queue_length: int = 0
    reported_queue_length: int = 0
    dispatched_since_report: int = 0
    ended_since_report: int = 0
    #: incremented by every registration of this name; lets an operation that awaited
    #: (a refresh probe) tell whether the entry it looked at is still the current one
    generation: int = 0
    #: streams this controller is relaying to the worker right now
    active_streams: int = 0
    #: relayed requests that failed in a row (reset by one that succeeds)
    consecutive_failures: int = 0
    #: the worker is out of rotation until this time (the registry's clock)
    ejected_until: float = 0.0

    def report(self, queue_length: int, now: float) -> None:
        """Take a fresh queue length from the worker; it includes everything before it."""
        self.queue_length = queue_length
        self.reported_queue_length = queue_length
        self.dispatched_since_report = 0
        self.ended_since_report = 0
        self.last_heart_beat = now

    def dispatched(self) -> None:
        """One more request was sent (or handed out) to this worker."""
        self.queue_length += 1
        self.dispatched_since_report += 1

    def stream_ended(self) -> None:
        """A request this controller relayed to the worker (a stream or a single call) has
        ended, however it ended."""
        self.ended_since_report += 1
        if self.queue_length > 0:
            self.queue_length -= 1

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.model_names, self.speed, self.queue_length)
