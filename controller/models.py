"""Value types shared by the registry, the dispatcher and the wire protocol."""

from __future__ import annotations

import collections
import enum
import json

import attrs

__all__ = ["DispatchMethod", "ErrorProfile", "WorkerInfo", "WorkerStatus"]


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


#: weight of a new observation in a worker's learned service time
SERVICE_TIME_SMOOTHING = 0.25
#: learned service times are kept within these bounds (seconds)
MIN_SERVICE_TIME = 0.001
MAX_SERVICE_TIME = 3600.0


@attrs.define(eq=False, slots=True)
class WorkerInfo:
    """One registered worker and the controller's view of its load.

    ``queue_length`` is the number the dispatcher uses: what the worker last reported, plus
    what was dispatched to it since that report, minus the requests this controller relayed
    to it that have ended since, minus the requests handed out by address that are presumed
    finished because the worker's learned service time has passed (never below zero). It is
    kept up to date on each event, so reading it costs nothing; the per-report counters
    beside it say how it was reached.
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
    #: when the worker last reported its queue (0 before the first report)
    reported_at: float = 0.0
    #: learned seconds a request spends at this worker (queueing included); None until
    #: there is evidence
    service_time: float | None = None
    #: when each request handed out by address since the last report is presumed done,
    #: in dispatch order (None while there are none, to keep idle entries small)
    retire_at: collections.deque[float] | None = None
    #: when the first request after a report that found the worker idle was sent
    busy_since: float = 0.0
    #: of the last reported queue, how many requests this controller will not see end and
    #: presumes finished over one service time, and how many it has retired so far
    reported_to_retire: int = 0
    reported_retired: int = 0
    #: incremented by every registration of this name; lets an operation that awaited
    #: (a refresh probe) tell whether the entry it looked at is still the current one
    generation: int = 0
    #: streams this controller is relaying to the worker right now
    active_streams: int = 0
    #: relayed requests that failed in a row (reset by one that succeeds)
    consecutive_failures: int = 0
    #: the worker is out of rotation until this time (the registry's clock)
    ejected_until: float = 0.0
    #: the ``/get_worker_address`` answer naming this worker, encoded once
    address_body: bytes = attrs.field(init=False)
    #: load polls of this worker wait until then (backs off after failed polls)
    next_poll_at: float = 0.0
    poll_failures: int = 0

    @address_body.default
    def _encode_address(self) -> bytes:
        return json.dumps({"address": self.name}).encode()

    def report(self, queue_length: int, now: float) -> None:
        """Take a fresh queue length from the worker; it includes everything before it.

        Between two reports, Little's law relates what the worker holds on average, how
        many requests it finished and how long each took; that gives one observation of its
        service time (reports are snapshots, so the average is the mean of the two).
        """
        if self.reported_at:
            # From the report, or, if the worker was idle then, from the first request
            # after it: idle time would inflate the observation.
            start = self.reported_at
            if not self.reported_queue_length and self.busy_since > start:
                start = self.busy_since
            interval = now - start
            finished = self.reported_queue_length + self.dispatched_since_report - queue_length
            held = (self.reported_queue_length + queue_length) / 2
            if finished > 0 and interval > 0 and held > 0:
                self.learn_service_time(held * interval / finished)
        self.queue_length = queue_length
        self.reported_queue_length = queue_length
        self.dispatched_since_report = 0
        self.ended_since_report = 0
        self.retire_at = None
        self.reported_at = now
        self.last_heart_beat = now
        # The reported requests finish too, one service time from now at the latest: left
        # counted until the next report, a stale report doubles the estimate of a busy
        # worker. The streams this controller relays end by themselves and are left out.
        self.reported_retired = 0
        self.reported_to_retire = (
            max(queue_length - self.active_streams, 0) if self.service_time is not None else 0
        )

    def learn_service_time(self, seconds: float) -> None:
        """Fold one observation of the time a request spent at the worker into the estimate."""
        seconds = min(max(seconds, MIN_SERVICE_TIME), MAX_SERVICE_TIME)
        if self.service_time is None:
            self.service_time = seconds
        else:
            self.service_time += SERVICE_TIME_SMOOTHING * (seconds - self.service_time)

    def dispatched(self, now: float, retire_at: float | None = None) -> None:
        """One more request was sent (or handed out) to this worker at ``now``.

        ``retire_at`` is when a request handed out by address (whose end this controller
        will not see) stops counting; ``None`` keeps it until the next report.
        """
        if not self.dispatched_since_report and not self.reported_queue_length:
            # Idle since the last report until now: only the time from here on counts.
            self.busy_since = now
        self.queue_length += 1
        self.dispatched_since_report += 1
        if retire_at is not None:
            if self.retire_at is None:
                self.retire_at = collections.deque()
            self.retire_at.append(retire_at)

    @property
    def retiring(self) -> bool:
        """Whether some counted requests are waiting to be presumed finished."""
        return bool(self.retire_at) or self.reported_retired < self.reported_to_retire

    def retire(self, now: float) -> None:
        """Stop counting the requests presumed finished by now.

        Those handed out by address retire one service time after they were sent; those
        in the last report retire evenly over one service time after it.
        """
        pending = self.retire_at
        while pending and pending[0] <= now:
            pending.popleft()
            if self.queue_length > 0:
                self.queue_length -= 1
        left = self.reported_to_retire - self.reported_retired
        if left > 0 and self.service_time:
            elapsed = now - self.reported_at
            due = min(
                int(elapsed / self.service_time * self.reported_to_retire + 0.5),
                self.reported_to_retire,
            )
            if due > self.reported_retired:
                self.queue_length = max(self.queue_length - (due - self.reported_retired), 0)
                self.reported_retired = due

    def stream_ended(self) -> None:
        """A request this controller relayed to the worker (a stream or a single call) has
        ended, however it ended."""
        self.ended_since_report += 1
        if self.queue_length > 0:
            self.queue_length -= 1

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.model_names, self.speed, self.queue_length)
