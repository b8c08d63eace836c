"""Passive health: a worker whose relayed requests fail is taken out of rotation for a
while, and brought back when it shows life. Local to each controller, not in the feed."""

from __future__ import annotations

from collections.abc import Callable

from .worker import Worker

__all__ = ["Health"]


class Health:
    """The registry's passive health checks (a base of
    :class:`~controller.decisions.registry.Registry`, which sets these attributes)."""

    #: after this many failed relays in a row a worker is an outlier: only its ejection
    #: running out brings it back, not a heartbeat or a successful probe
    OUTLIER_FAILURES = 3

    clock: Callable[[], float]
    ejection_base: float
    ejection_max: float
    #: called with a worker and the reason when it is back in rotation early
    on_back_in_rotation: Callable[[Worker, str], None] | None

    def record_failure(self, worker: Worker) -> float:
        """Take a worker out of rotation after a relayed request failed; returns for how long.

        The ejection doubles with each failure in a row, from ``ejection_base`` up to
        ``ejection_max``.
        """
        worker.consecutive_failures += 1
        doublings = min(worker.consecutive_failures - 1, 30)
        duration = min(self.ejection_base * (1 << doublings), self.ejection_max)
        now = self.clock()
        worker.last_failure_at = now
        worker.ejected_until = now + duration
        return duration

    def record_success(self, worker: Worker) -> int:
        """A relayed request succeeded; returns how many failures in a row it ends."""
        failures = worker.consecutive_failures
        if failures:
            worker.consecutive_failures = 0
            worker.ejected_until = 0.0
        return failures

    def is_ejected(self, worker: Worker) -> bool:
        return worker.ejected_until > self.clock()

    def _shows_life(self, worker: Worker, how: str) -> None:
        # A worker that failed once or twice is back as soon as it shows it is alive; an
        # outlier waits out its ejection whatever it says.
        if worker.consecutive_failures >= self.OUTLIER_FAILURES:
            return
        still_out = worker.ejected_until > self.clock()
        worker.ejected_until = 0.0
        if still_out and self.on_back_in_rotation is not None:
            self.on_back_in_rotation(worker, how)
