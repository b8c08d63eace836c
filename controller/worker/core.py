"""The heartbeat state machine both clients share: what to send next, what answers mean.

``Core`` holds the registration state, the counters, the backoff and the log lines; the
asyncio client (``controller.worker.client``) and the thread client
(``controller.worker.sync``) only move its bytes and sleep the delays it returns. No I/O
and no clock of its own: times are passed in. Standard library and attrs only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import attrs

from . import wire
from .config import HeartbeatConfig
from .rotation import Rotation

__all__ = [
    "Backoff",
    "ClientBase",
    "Core",
    "HeartbeatStats",
    "SupportsQueueLength",
    "queue_length_function",
    "valid_queue_length",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SupportsQueueLength(Protocol):
    """Anything with a ``queue_length`` (such as ``ConcurrencyLimiter``)."""

    @property
    def queue_length(self) -> int: ...


def queue_length_function(
    source: Callable[[], T] | SupportsQueueLength | None,
) -> Callable[[], T | int]:
    """What a client calls for the queue length: ``source`` itself, its attribute, or 0."""
    if source is None:
        return lambda: 0
    if callable(source):
        return source
    if hasattr(source, "queue_length"):
        return lambda: source.queue_length
    raise TypeError(
        f"queue_length must be a callable or have a queue_length attribute, got {source!r}"
    )


def valid_queue_length(value: object) -> int:
    """``value`` if it is a whole number of at least 0, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"queue_length must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"queue_length must be at least 0, got {value!r}")
    return value


@attrs.frozen
class HeartbeatStats:
    """A snapshot of a heartbeat client's state, for tests and monitoring."""

    #: the controller accepted the last registration and has not since said it forgot us
    registered: bool
    #: the last call got a usable answer (``None`` before the first call ends)
    connected: bool | None
    registrations: int
    heartbeats: int
    failures: int
    consecutive_failures: int
    #: the queue length in the last call sent
    queue_length: int
    last_error: str | None
    closed: bool
    #: the controller in use (credentials in its URL redacted)
    controller: str = ""
    #: how many times the client moved on to the next controller address
    switches: int = 0


@attrs.define
class Backoff:
    """Capped exponential backoff with jitter: ``base``, ``2*base``, ... up to ``cap``.

    Each delay is drawn from ``[d/2, d]`` so that workers that lost the same controller at
    the same moment do not all come back at the same instant.
    """

    base: float
    cap: float
    rng: random.Random
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 60))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Core:
    """What to send next and what the answers mean; no I/O, no clock of its own.

    The I/O layers call ``register_request``/``heartbeat_request`` to get a URL and body,
    hand the answer to ``on_register_answer``/``on_heartbeat_answer``, and ask
    ``after_exchange`` how long to wait. Times passed in are monotonic seconds from the
    caller's clock.
    """

    def __init__(self, config: HeartbeatConfig, rng: random.Random | None = None) -> None:
        self.config = config
        #: the controller in use, and the others to move on to
        self.rotation = Rotation(config.controller_addresses)
        jitter = rng if rng is not None else random.Random()
        self.backoff = Backoff(config.backoff_base, config.max_backoff, jitter)
        self.registered = False
        #: a registration was sent at least once, so the controller may know us
        self.register_attempted = False
        self.closed = False
        self._connected: bool | None = None
        self._down_since = 0.0
        self._registrations = 0
        self._heartbeats = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._queue_length = 0
        self._last_error: str | None = None
        self._queue_error_logged = False
        self._refusal_logged = False

    @property
    def where(self) -> str:
        """The controller in use as logs show it: credentials in its URL redacted."""
        return self.rotation.where

    # requests

    def register_request(self, queue_length: int) -> tuple[str, bytes]:
        self.register_attempted = True
        self._queue_length = queue_length
        return wire.register_request(self.config, self.rotation.address, queue_length)

    def heartbeat_request(self, queue_length: int) -> tuple[str, bytes]:
        self._queue_length = queue_length
        return wire.heartbeat_request(self.config, self.rotation.address, queue_length)

    def unregister_request(self) -> tuple[str, bytes]:
        return wire.unregister_request(self.config, self.rotation.address)

    # answers

    def on_register_answer(self, status: int, body: bytes, now: float) -> None:
        """Take the answer to a registration; ``BadAnswer`` if it is not a controller's."""
        wire.check_register_answer(status, body)
        cfg = self.config
        self._answered(now)
        self.registered = True
        self._registrations += 1
        log.info(
            "Registered worker %s (models %s) with controller %s",
            cfg.worker_address,
            ", ".join(cfg.model_names),
            self.where,
        )

    def on_heartbeat_answer(self, status: int, body: bytes, now: float) -> bool:
        """Take the answer to a heartbeat; whether the controller still knows the worker.

        ``BadAnswer`` if it is not a controller's answer.
        """
        exist = wire.parse_heartbeat_answer(status, body)
        self._answered(now)
        self._heartbeats += 1
        if exist:
            log.debug(
                "Heartbeat to %s: queue_length=%d",
                self.where,
                self._queue_length,
            )
            return True
        self.registered = False
        log.info(
            "Controller %s does not know worker %s (restarted or expired it): registering again",
            self.where,
            self.config.worker_address,
        )
        return False

    def after_exchange(
        self, started: float, now: float, error: Exception | None, expected: bool
    ) -> float:
        """Record how one exchange that began at ``started`` went; returns the wait until the next.

        ``expected`` says that ``error`` is what a call to an unreachable, slow or confused
        controller raises. Any other error is a bug in the client; it is logged with its
        traceback and retried like a failed call, because a bug must not stop heartbeats.
        """
        if error is None:
            # The interval runs from the start of this beat, however long the call took.
            return max(0.0, started + self.config.interval - now)
        if isinstance(error, wire.Refused):
            return self._on_refusal(error, now)
        if not expected:
            return self._on_failure(wire.describe(error, 0), now, error)
        reason = wire.describe(error, self.config.request_timeout)
        if not (self.rotation.several and wire.unreachable(error)):
            self.rotation.answered()  # a controller answered, or there is no other
            return self._on_failure(reason, now)
        # The registration carries over to the next controller: one sharing the registry
        # knows the worker; any other answers the heartbeat exist: false and gets a fresh
        # registration. Untried controllers are tried at once; after a round of failures
        # the backoff spaces the rounds.
        where = self.where
        if self.rotation.move_on(reason, quiet=self._connected is False):
            self._failures += 1
            self._consecutive_failures += 1
            self._last_error = reason
            return 0.0
        reason = f"{reason}; no other controller answers either, {self.where} is next"
        return self._down(where, reason, now, None)

    def _on_failure(self, reason: str, now: float, error: BaseException | None = None) -> float:
        return self._down(self.where, reason, now, error)

    def _down(self, where: str, reason: str, now: float, error: BaseException | None) -> float:
        # The first failure after a success is logged once at WARNING (with a traceback
        # for errors nobody expected); the rest stay at DEBUG until the controller answers.
        self._failures += 1
        self._consecutive_failures += 1
        self._last_error = reason
        delay = self.backoff.next_delay()
        if self._connected is not False:
            self._connected = False
            self._down_since = now
            log.warning(
                "Cannot reach controller %s (%s); retrying every %g s at most until it answers",
                where,
                reason,
                self.config.max_backoff,
                exc_info=error,
            )
        else:
            log.debug(
                "Controller %s still unreachable (%s); attempt %d, next in %.2f s",
                where,
                reason,
                self._consecutive_failures,
                delay,
            )
        return delay

    def _on_refusal(self, error: wire.Refused, now: float) -> float:
        # Nothing fixes this but the operator: say what to change, once, at ERROR, and
        # keep trying (a new token file may be deployed while the worker runs).
        first = not self._refusal_logged
        self._refusal_logged = True
        self.rotation.answered()
        self._connected = True
        self._failures += 1
        self._consecutive_failures += 1
        self._last_error = str(error)
        delay = self.backoff.next_delay()
        if first:
            cfg = self.config
            fix = (
                "its token is not one of the controller's worker tokens, or another "
                "principal registered this worker_name (an admin token can remove it)"
                if cfg.token is not None
                else "the controller requires a worker token: give one (HeartbeatConfig "
                "token, fc-demo-worker --controller-token-file or FC_CONTROLLER_TOKEN), or "
                "have the controller trust this worker's network (--trust-workers-from)"
            )
            log.error(
                "Controller %s refused worker %s (%s): %s; retrying every %g s at most",
                self.where,
                cfg.worker_address,
                error,
                fix,
                cfg.max_backoff,
            )
        return delay

    def _answered(self, now: float) -> None:
        self._refusal_logged = False
        self.rotation.answered()
        if self._connected is False:
            log.info(
                "Controller %s answers again after %d failed attempts over %.1f s",
                self.where,
                self._consecutive_failures,
                now - self._down_since,
            )
        self._connected = True
        self._consecutive_failures = 0
        self.backoff.reset()

    # the goodbye

    def on_unregister_answer(self, status: int, body: bytes) -> None:
        """Log how the goodbye went; never raises."""
        cfg = self.config
        try:
            removed = wire.parse_unregister_answer(status, body)
        except wire.BadAnswer as e:
            self.on_unregister_failed(e)
            return
        log.info(
            "Told controller %s that worker %s is leaving (%s)",
            self.where,
            cfg.worker_address,
            "removed" if removed else "it did not know the worker",
        )

    def on_unregister_failed(self, error: BaseException) -> None:
        """Log that the goodbye did not get through; the controller will expire the worker."""
        reason = wire.describe(error, self.config.unregister_timeout)
        if reason.startswith(("HTTP 404", "HTTP 405")):
            reason = "this controller has no /unregister_worker; it will expire the worker instead"
        log.info(
            "Could not tell controller %s that worker %s is leaving: %s",
            self.where,
            self.config.worker_address,
            reason,
        )

    # the worker's queue length

    def queue_length_ok(self, value: object) -> int:
        """Accept what the worker's callable returned; ``TypeError``/``ValueError`` if bad."""
        queue_length = valid_queue_length(value)
        if self._queue_error_logged:
            self._queue_error_logged = False
            log.info("The worker's queue_length callable works again")
        return queue_length

    def queue_length_failed(self, error: BaseException) -> int:
        """The worker's callable failed: report the last good value, warn once."""
        if not self._queue_error_logged:
            self._queue_error_logged = True
            log.warning(
                "The worker's queue_length callable failed (%s); reporting the last value, %d",
                wire.describe(error, 0),
                self._queue_length,
                exc_info=error,
            )
        return self._queue_length

    def statistics(self) -> HeartbeatStats:
        return HeartbeatStats(
            registered=self.registered,
            connected=self._connected,
            registrations=self._registrations,
            heartbeats=self._heartbeats,
            failures=self._failures,
            consecutive_failures=self._consecutive_failures,
            queue_length=self._queue_length,
            last_error=self._last_error,
            closed=self.closed,
            controller=self.where,
            switches=self.rotation.switches,
        )


class ClientBase(Generic[T]):
    """What both heartbeat clients hold: their settings, where their queue length comes
    from, the core that decides what to send, and the clock that times it."""

    def __init__(
        self,
        config: HeartbeatConfig,
        queue_length: Callable[[], T],
        rng: random.Random | None,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._queue_length = queue_length
        self._core = Core(config, rng)
        self._clock = clock

    @property
    def controller_in_use(self) -> str:
        """The address of the controller the client talks to now (the first of
        ``config.controller_addresses`` until one cannot be reached)."""
        return self._core.rotation.address
