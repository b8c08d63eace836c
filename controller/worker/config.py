"""The heartbeat clients' settings: ``HeartbeatConfig`` and the environment variable it reads.

Standard library and attrs only, so that the thread client stays free of aiohttp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from .tokens import check_token

# No __all__ here: ``controller.worker`` lists the public names once, in its own.

ENV_HEART_BEAT_INTERVAL = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"
DEFAULT_HEART_BEAT_INTERVAL = 45.0
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_UNREGISTER_TIMEOUT = 2.0
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 30.0
#: the largest speed a controller accepts in a registration
MAX_SPEED = 10_000


def _positive_seconds(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _speed(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"speed must be a number, got {value!r}")
    # The controller refuses a registration outside (0, 10,000].
    if not (math.isfinite(value) and 0 < value <= MAX_SPEED):
        raise ValueError(f"speed must be above 0 and at most {MAX_SPEED}, got {value!r}")


def _token(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None:
        check_token(value, "token")


def _base_url(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string such as 'http://host:port', got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an http(s) URL such as 'http://host:port', got {value!r}")
    # FastChat's clients append paths with '+', so a trailing slash would double up.
    return value.strip().rstrip("/")


def controller_addresses(
    value: str | Iterable[str], name: str = "controller_address"
) -> tuple[str, ...]:
    """The controller addresses in ``value``: one URL, several separated by commas, or a
    sequence of URLs; each checked and without its trailing slash, in the order given.

    A bad entry raises ``ValueError`` (``TypeError`` for a non-string) naming ``name`` and
    the entry; so do an empty entry and an address listed twice. A comma inside an address
    must be written ``%2C``.
    """
    if isinstance(value, str):
        entries = value.split(",")
    elif isinstance(value, Iterable):
        entries = list(value)
    else:
        raise TypeError(f"{name} must be a string such as 'http://host:port', got {value!r}")
    count = len(entries)
    addresses: list[str] = []
    for position, entry in enumerate(entries, 1):
        where = f"{name} (address {position} of {count} in {value!r})" if count > 1 else name
        if isinstance(entry, str) and not entry.strip():
            raise ValueError(
                f"{where} is empty: separate controller addresses with single commas"
                if count > 1
                else f"{name} must be an http(s) URL such as 'http://host:port', got {value!r}"
            )
        address = _base_url(where, entry)
        if address in addresses:
            raise ValueError(f"{name} lists {address!r} twice, in {value!r}")
        addresses.append(address)
    if not addresses:
        raise ValueError(f"{name} must name at least one controller, got {value!r}")
    return tuple(addresses)


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

    ``controller_address`` may name several controllers (``"http://a:21001,http://b:21001"``,
    replicas of one logical controller): the client registers with the first that answers
    and, when the one in use cannot be reached, moves on to the next.

    After a failed call the client waits ``backoff_base``, then twice that, and so on, up to
    ``backoff_cap`` (never more than ``interval``, so a controller that comes back gets its
    workers within one interval); each wait is jittered down by up to half.
    """

    #: the controllers to register with, in order of preference; given as
    #: ``controller_address``: one URL, several separated by commas, or a sequence
    controller_addresses: tuple[str, ...] = attrs.field(
        converter=controller_addresses, alias="controller_address"
    )
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
    #: sent as ``Authorization: Bearer TOKEN`` to a controller that closes its worker role
    #: (never shown in a repr or a log line)
    token: str | None = attrs.field(default=None, repr=False, validator=_token)

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
    def controller_address(self) -> str:
        """The controller addresses as given, comma-separated (one address: that URL)."""
        return ",".join(self.controller_addresses)

    @property
    def max_backoff(self) -> float:
        """The longest wait between two attempts while the controller is unreachable."""
        return min(self.backoff_cap, self.interval)
