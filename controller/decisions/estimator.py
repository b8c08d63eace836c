"""The controller's estimate of one worker's load and of how long it takes per request.

Pure bookkeeping, time passed in: what the worker last reported, what was dispatched to it
since, what this controller saw end, and the service time learned from the order requests
finish in. The registry owns one per registered worker; the router and the relay update it
as they dispatch and as relays end.
"""

from __future__ import annotations

import collections
import math

import attrs

__all__ = ["LoadEstimate"]

#: weight of a new observation in a worker's learned service time
SERVICE_TIME_SMOOTHING = 0.25
#: learned service times are kept within these bounds (seconds)
MIN_SERVICE_TIME = 0.001
MAX_SERVICE_TIME = 3600.0
#: dispatch times remembered per worker for the evidence a report gives (older ones are
#: forgotten: they count as requests of unknown age)
MAX_TRACKED_DISPATCHES = 1024
#: a request handed out by address may take this long to reach its worker (seconds)
IN_TRANSIT = 0.05


@attrs.define(eq=False, slots=True)
class LoadEstimate:
    """One worker's load as dispatch sees it, and its learned service time.

    ``queue_length`` is the number the dispatcher uses: what the worker last reported, plus
    what was dispatched to it since that report, minus the requests this controller relayed
    to it that have ended since, minus the requests handed out by address that are presumed
    finished because the worker's learned service time has passed (never below zero). It is
    kept up to date on each event, so reading it costs nothing; the per-report counters
    beside it say how it was reached.
    """

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
    #: when each request presumed still at the worker was sent, oldest first, with how
    #: many service times it was expected to take then (more when it had to queue):
    #: reports are read as if the worker serves in order (see ``report``)
    #: (None while there are none: an empty deque costs 600 bytes, times 10,000 workers)
    sent_at: collections.deque[tuple[float, int]] | None = None
    #: how long a request is known to take at least, while no estimate exists yet
    service_floor: float = 0.0
    #: when ``service_time`` last got an observation
    learned_at: float = 0.0
    #: of the last reported queue, how many requests this controller will not see end and
    #: presumes finished evenly over ``reported_rounds`` service times (the rounds of its
    #: slots the worker needs to get through them), and how many it has retired so far
    reported_to_retire: int = 0
    reported_retired: int = 0
    reported_rounds: int = 1
    #: requests this controller is relaying to the worker right now
    active_streams: int = 0
    #: requests other replicas of a shared registry sent since the worker's last report,
    #: as they published them (see :mod:`controller.sharing.redis_load`); counted in
    #: ``queue_length`` and dropped with the next report, which includes them
    others: int = 0

    def report(self, queue_length: int, now: float, slots: int | None = None) -> None:
        """Take a fresh queue length from the worker; it includes everything before it.

        The report says how many of the requests sent to the worker are still there. Read
        as if it serves them in order, it tells which ones: the ``queue_length`` sent last.
        Then the youngest one that has finished took at most its age, and the oldest one
        still there at least its own, which brackets the service time after a single
        report (see ``_learn_from_order``). When that bracket is loose, Little's law
        gives the observation instead: between two reports the worker held on average
        the mean of the two, and finished the difference plus what was dispatched since.

        ``slots`` (how many requests the worker runs at once; one if not known) says how
        long the reported requests take to drain.
        """
        if not self._learn_from_order(queue_length, now) and self.reported_at:
            # From the report, or, if the worker was idle then, from the first request
            # after it: idle time would inflate the observation.
            start = self.reported_at
            if not self.reported_queue_length and self.busy_since > start:
                start = self.busy_since
            interval = now - start
            finished = self.reported_queue_length + self.dispatched_since_report - queue_length
            held = (self.reported_queue_length + queue_length) / 2
            if finished > 0 and interval > 0 and held > 0:
                self.learn_service_time(held * interval / finished, now)
        self.queue_length = queue_length
        self.reported_queue_length = queue_length
        self.others = 0
        self.dispatched_since_report = 0
        self.ended_since_report = 0
        self.retire_at = None
        self.reported_at = now
        # The reported requests finish too, one service time from now at the latest: left
        # counted until the next report, a stale report doubles the estimate of a busy
        # worker. The streams this controller relays end by themselves and are left out.
        self.reported_retired = 0
        self.reported_to_retire = (
            max(queue_length - self.active_streams, 0) if self.service_time is not None else 0
        )
        # A worker holding more than it has slots for gets through them a round at a time:
        # presumed gone in one service time, a deep queue would look empty at once.
        rounds = self.reported_to_retire if slots is None else -(-self.reported_to_retire // slots)
        self.reported_rounds = max(rounds, 1)

    def _learn_from_order(self, queue_length: int, now: float) -> bool:
        """Learn from which requests a report shows finished; ``True`` if it gave a sample.

        Requests sent together finish in about the order they were sent, so of the
        ``sent_at`` requests the oldest finished first. The youngest finished one took at
        most ``now - its send time``; the oldest still there at least ``now - its send
        time``, and so did the youngest finished one if it was there at the last report.
        Each is divided by the service times the request was expected to take when it was
        sent (one, or more if it had to wait for a slot), so time spent queueing, which the
        policies count from the queue length, is not counted again. When the bounds are
        within a factor of two, their middle is one observation of the service time. Until
        a worker has one, the lower bound alone is kept as a floor for its estimate, so a
        slow worker stops getting work before it is seen to finish anything.

        A request handed out by address reaches the worker only when the client connects,
        so the worker may not count the ones sent in the last ``IN_TRANSIT`` seconds yet:
        the bounds are widened to hold whether or not it does, else a report taken before
        they arrive would pass them off as older requests that finished early.
        """
        sent = self.sent_at
        if not sent:
            # Everything the worker holds was sent by someone else, or before this
            # controller knew it: no ages, no bounds.
            return False
        young = 0
        for sent_time, _ in reversed(sent):
            if sent_time <= now - IN_TRANSIT:
                break
            young += 1
        # The bounds if every young request has arrived, and if none has.
        finished, lower, upper = self._bounds(queue_length, now, len(sent))
        if young:
            finished, lower_alt, upper_alt = self._bounds(queue_length, now, len(sent) - young)
            lower = min(lower, lower_alt)
            upper = max(upper, upper_alt)
        for _ in range(finished):
            sent.popleft()
        if not sent:
            self.sent_at = None
        learned = False
        if upper < math.inf and lower >= upper / 2:
            self.learn_service_time((lower + upper) / 2, now)
            learned = True
        if self.service_time is None and lower > self.service_floor:
            self.service_floor = min(lower, MAX_SERVICE_TIME)
        return learned

    def _bounds(self, queue_length: int, now: float, counted: int) -> tuple[int, float, float]:
        """How many of the first ``counted`` of ``sent_at`` (the ones the worker's report
        includes) finished, and the bounds that puts on the service time."""
        sent = self.sent_at
        assert sent is not None
        # Requests the worker holds beyond these (sent by someone else, or before this
        # controller knew it) count as the oldest: nothing better is known of their age.
        finished = max(counted - queue_length, 0)
        lower = 0.0
        upper = math.inf
        if finished:
            youngest_done, periods = sent[finished - 1]
            upper = (now - youngest_done) / periods
            if self.reported_at and youngest_done <= self.reported_at:
                lower = (self.reported_at - youngest_done) / periods
        if finished < counted:
            oldest, periods = sent[finished]
            lower = max(lower, (now - oldest) / periods)
        return finished, lower, upper

    def learn_service_time(self, seconds: float, now: float) -> None:
        """Fold one observation (made at ``now``) of the time a request spent at the worker
        into the estimate."""
        self.learned_at = now
        seconds = min(max(seconds, MIN_SERVICE_TIME), MAX_SERVICE_TIME)
        if self.service_time is None:
            self.service_time = max(seconds, self.service_floor)
            self.service_floor = 0.0
        else:
            self.service_time += SERVICE_TIME_SMOOTHING * (seconds - self.service_time)

    def dispatched(self, now: float, retire_at: float | None = None, periods: int = 1) -> None:
        """One more request was sent (or handed out) to this worker at ``now``.

        ``retire_at`` is when a request handed out by address (whose end this controller
        will not see) stops counting; ``None`` keeps it until the next report. ``periods``
        is how many service times it is expected to take, waiting for a slot included.
        """
        if not self.dispatched_since_report and not self.reported_queue_length:
            # Idle since the last report until now: only the time from here on counts.
            self.busy_since = now
        self.queue_length += 1
        self.dispatched_since_report += 1
        sent = self.sent_at
        if sent is None:
            # Past its length, the oldest goes: from then on a request of unknown age.
            sent = self.sent_at = collections.deque(maxlen=MAX_TRACKED_DISPATCHES)
        sent.append((now, periods))
        if retire_at is not None:
            if self.retire_at is None:
                self.retire_at = collections.deque()
            self.retire_at.append(retire_at)

    def retire(self, now: float) -> None:
        """Stop counting the requests presumed finished by now.

        Those handed out by address retire when they were expected to be done; those in
        the last report retire evenly over the time the worker needs to get through them.
        """
        pending = self.retire_at
        while pending and pending[0] <= now:
            pending.popleft()
            if self.queue_length > 0:
                self.queue_length -= 1
        left = self.reported_to_retire - self.reported_retired
        if left > 0 and self.service_time:
            elapsed = now - self.reported_at
            drain = self.service_time * self.reported_rounds
            due = min(
                int(elapsed / drain * self.reported_to_retire + 0.5),
                self.reported_to_retire,
            )
            if due > self.reported_retired:
                self.queue_length = max(self.queue_length - (due - self.reported_retired), 0)
                self.reported_retired = due

    def set_others(self, count: int) -> None:
        """Other replicas have sent ``count`` requests since the last report (in all)."""
        self.queue_length = max(self.queue_length + count - self.others, 0)
        self.others = count

    @property
    def mine_since_report(self) -> int:
        """The requests this controller sent since the last report and still counts: what
        it tells the other replicas (never more than it believes the worker holds)."""
        return min(self.dispatched_since_report, max(self.queue_length - self.others, 0))

    def stream_ended(self) -> None:
        """A request this controller relayed to the worker (a stream or a single call) has
        ended, however it ended."""
        self.ended_since_report += 1
        if self.queue_length > 0:
            self.queue_length -= 1
