"""The part of the worker-side helpers that does no I/O.

Settings, backoff, the bodies sent to the controller, the checks on its answers and the
register/heartbeat state machine live here, shared by the asyncio client
(``controller.client``) and the thread client (``controller._client_sync``). This module
imports only the standard library and attrs, so the thread client stays free of aiohttp.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_HEART_BEAT_INTERVAL",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_UNREGISTER_TIMEOUT",
    "ENV_HEART_BEAT_INTERVAL",
    "Backoff",
    "HeartbeatConfig",
    "HeartbeatStats",
    "SupportsQueueLength",
    "heart_beat_interval_from_environ",
]

# Both clients log under this one name, so a worker tunes or silences them in one place.
log = logging.getLogger("controller.client")

ENV_HEART_BEAT_INTERVAL = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"
DEFAULT_HEART_BEAT_INTERVAL = 45.0
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_UNREGISTER_TIMEOUT = 2.0
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 30.0

JSON_HEADERS = {"Content-Type": "application/json"}


class SupportsQueueLength(Protocol):
    """Anything with a ``queue_length`` (such as ``ConcurrencyLimiter``)."""

    @property
    def queue_length(self) -> int: ...


# -- settings ------------------------------------------------------------------------------


def _positive_seconds(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _speed(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"speed must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"speed must be a finite number of at least 0, got {value!r}")


def _base_url(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string such as 'http://host:port', got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an http(s) URL such as 'http://host:port', got {value!r}")
    # FastChat's clients append paths with '+', so a trailing slash would double up.
    return value.strip().rstrip("/")


def _controller_address(value: str) -> str:
    return _base_url("controller_address", value)


def _worker_address(value: str) -> str:
    return _base_url("worker_address", value)


def _model_names(value: Iterable[str]) -> tuple[str, ...]:
    # A lone string would otherwise become a tuple of its characters.
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_names must be one or more non-empty strings, got {value!r}")
    return names


def heart_beat_interval_from_environ(environ: Mapping[str, str]) -> float | None:
    """The interval set by ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL`` in ``environ``, if any.

    An unset or empty variable gives ``None``. Anything but a positive number of seconds
    raises ``ValueError`` naming the variable.
    """
    raw = environ.get(ENV_HEART_BEAT_INTERVAL, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{ENV_HEART_BEAT_INTERVAL} must be a positive number of seconds, got {raw!r}"
        )
    return value


@attrs.frozen(kw_only=True)
class HeartbeatConfig:
    """What a worker tells its controller, and how often and how patiently it does so.

    ``worker_address`` is the worker's public base URL; the controller knows the worker by
    it (FastChat calls it ``worker_name``) and sends requests to it. Times are in seconds.

    After a failed call the client waits ``backoff_base``, then twice that, and so on, up to
    ``backoff_cap`` (never more than ``interval``, so a controller that comes back gets its
    workers within one interval); each wait is jittered down by up to half.
    """

    controller_address: str = attrs.field(converter=_controller_address)
    worker_address: str = attrs.field(converter=_worker_address)
    model_names: tuple[str, ...] = attrs.field(converter=_model_names)
    speed: float = attrs.field(default=1.0, validator=_speed)
    multimodal: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    interval: float = attrs.field(default=DEFAULT_HEART_BEAT_INTERVAL, validator=_positive_seconds)
    #: bound on each registration or heartbeat call
    request_timeout: float = attrs.field(
        default=DEFAULT_REQUEST_TIMEOUT, validator=_positive_seconds
    )
    #: bound on the goodbye sent when the client closes
    unregister_timeout: float = attrs.field(
        default=DEFAULT_UNREGISTER_TIMEOUT, validator=_positive_seconds
    )
    backoff_base: float = attrs.field(default=DEFAULT_BACKOFF_BASE, validator=_positive_seconds)
    backoff_cap: float = attrs.field(default=DEFAULT_BACKOFF_CAP, validator=_positive_seconds)
    #: tell the controller when the client closes, so it stops routing here at once
    unregister_on_close: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **settings: Any
    ) -> HeartbeatConfig:
        """Make a config whose ``interval`` defaults to ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL``.

        ``environ`` defaults to ``os.environ``; tests pass a dict. Keyword ``settings`` are
        the fields of this class and win over the environment.
        """
        if environ is None:
            import os

            environ = os.environ
        if "interval" not in settings:
            interval = heart_beat_interval_from_environ(environ)
            if interval is not None:
                settings["interval"] = interval
        return cls(**settings)

    @property
    def max_backoff(self) -> float:
        """The longest wait between two attempts while the controller is unreachable."""
        return min(self.backoff_cap, self.interval)


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


# -- backoff -------------------------------------------------------------------------------


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


# -- wire ----------------------------------------------------------------------------------


class BadAnswer(Exception):
    """The controller answered, but not with something a controller would say."""


def _preview(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return text or "(empty body)"


def _decode(status: int, body: bytes) -> Any:
    if status != 200:
        raise BadAnswer(f"HTTP {status}: {_preview(body)}")
    try:
        return json.loads(body)
    except ValueError:
        raise BadAnswer(f"answer is not JSON: {_preview(body)}") from None


def check_register_answer(status: int, body: bytes) -> None:
    """Accept the controller's answer to ``/register_worker`` (200 and JSON) or raise."""
    _decode(status, body)


def parse_heartbeat_answer(status: int, body: bytes) -> bool:
    """The ``exist`` flag of an answer to ``/receive_heart_beat``, or ``BadAnswer``."""
    data = _decode(status, body)
    exist = data.get("exist") if isinstance(data, dict) else None
    if not isinstance(exist, bool):
        raise BadAnswer(f"answer has no true/false 'exist': {_preview(body)}")
    return exist


def parse_unregister_answer(status: int, body: bytes) -> bool:
    """Whether ``/unregister_worker`` removed the worker, or ``BadAnswer``."""
    data = _decode(status, body)
    removed = data.get("removed") if isinstance(data, dict) else None
    if not isinstance(removed, bool):
        raise BadAnswer(f"answer has no true/false 'removed': {_preview(body)}")
    return removed


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def describe(error: BaseException, timeout: float) -> str:
    """A short reason for a failed call, for the log."""
    # urllib wraps a timeout in URLError(reason=TimeoutError(...)).
    if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(error) or type(error).__name__


def valid_queue_length(value: object) -> int:
    """``value`` if it is a whole number of at least 0, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"queue_length must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"queue_length must be at least 0, got {value!r}")
    return value


# -- the state machine ---------------------------------------------------------------------


class Core:
    """What to send next and what the answers mean; no I/O, no clock of its own.

    The I/O layers call ``register_request``/``heartbeat_request`` to get a URL and body,
    and report back with ``on_registered``, ``on_heartbeat`` or ``on_failure``. Times
    passed in are monotonic seconds from the caller's clock.
    """

    def __init__(self, config: HeartbeatConfig, rng: random.Random) -> None:
        self.config = config
        self.backoff = Backoff(config.backoff_base, config.max_backoff, rng)
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

    # requests

    def register_request(self, queue_length: int) -> tuple[str, bytes]:
        cfg = self.config
        self.register_attempted = True
        self._queue_length = queue_length
        body = {
            "worker_name": cfg.worker_address,
            "check_heart_beat": True,
            "worker_status": {
                "model_names": list(cfg.model_names),
                # FastChat's workers send the integer 1; keep whole speeds whole.
                "speed": int(cfg.speed) if float(cfg.speed).is_integer() else cfg.speed,
                "queue_length": queue_length,
            },
            "multimodal": cfg.multimodal,
        }
        return f"{cfg.controller_address}/register_worker", _encode(body)

    def heartbeat_request(self, queue_length: int) -> tuple[str, bytes]:
        cfg = self.config
        self._queue_length = queue_length
        body = {"worker_name": cfg.worker_address, "queue_length": queue_length}
        return f"{cfg.controller_address}/receive_heart_beat", _encode(body)

    def unregister_request(self) -> tuple[str, bytes]:
        cfg = self.config
        return f"{cfg.controller_address}/unregister_worker", _encode(
            {"worker_name": cfg.worker_address}
        )

    # outcomes

    def on_registered(self, now: float) -> None:
        cfg = self.config
        self._answered(now)
        self.registered = True
        self._registrations += 1
        log.info(
            "Registered worker %s (models %s) with controller %s",
            cfg.worker_address,
            ", ".join(cfg.model_names),
            cfg.controller_address,
        )

    def on_heartbeat(self, exist: bool, now: float) -> None:
        self._answered(now)
        self._heartbeats += 1
        if exist:
            log.debug(
                "Heartbeat to %s: queue_length=%d",
                self.config.controller_address,
                self._queue_length,
            )
            return
        self.registered = False
        log.info(
            "Controller %s does not know worker %s (restarted or expired it): registering again",
            self.config.controller_address,
            self.config.worker_address,
        )

    def on_failure(self, reason: str, now: float, error: BaseException | None = None) -> float:
        """Record a failed call; returns how long to wait before the next attempt.

        The first failure after a success is logged once at WARNING (with a traceback if
        ``error`` is given, for errors nobody expected); the rest stay at DEBUG until the
        controller answers again.
        """
        self._failures += 1
        self._consecutive_failures += 1
        self._last_error = reason
        delay = self.backoff.next_delay()
        if self._connected is not False:
            self._connected = False
            self._down_since = now
            log.warning(
                "Cannot reach controller %s (%s); retrying every %g s at most until it answers",
                self.config.controller_address,
                reason,
                self.config.max_backoff,
                exc_info=error,
            )
        else:
            log.debug(
                "Controller %s still unreachable (%s); attempt %d, next in %.2f s",
                self.config.controller_address,
                reason,
                self._consecutive_failures,
                delay,
            )
        return delay

    def _answered(self, now: float) -> None:
        if self._connected is False:
            log.info(
                "Controller %s answers again after %d failed attempts over %.1f s",
                self.config.controller_address,
                self._consecutive_failures,
                now - self._down_since,
            )
        self._connected = True
        self._consecutive_failures = 0
        self.backoff.reset()

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
                describe(error, 0),
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
        )


def log_unregistered(config: HeartbeatConfig, removed: bool) -> None:
    log.info(
        "Told controller %s that worker %s is leaving (%s)",
        config.controller_address,
        config.worker_address,
        "removed" if removed else "it did not know the worker",
    )


def log_unregister_failed(config: HeartbeatConfig, reason: str) -> None:
    if reason.startswith(("HTTP 404", "HTTP 405")):
        reason = "this controller has no /unregister_worker; it will expire the worker instead"
    log.info(
        "Could not tell controller %s that worker %s is leaving: %s",
        config.controller_address,
        config.worker_address,
        reason,
    )
