"""The controller's settings, validated once when they are made."""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from .credentials import Access, IPNetwork, parse_networks
from .decisions.models import DispatchMethod, ErrorProfile
from .errors import ConfigError
from .worker.config import controller_addresses

__all__ = ["MEMORY_REGISTRY", "ControllerConfig", "check_registry", "redact_registry"]

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 21001
DEFAULT_HEART_BEAT_EXPIRATION = 90.0
DEFAULT_WORKER_API_TIMEOUT = 100.0
DEFAULT_STATUS_PROBE_TIMEOUT = 5.0
# Large enough for multimodal prompts carrying several base64 images.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
# uvicorn's default: enough for a burst of new streams without the kernel dropping SYNs
# (aiohttp's own default of 128 made clients wait out a 1 s retransmit at 256).
DEFAULT_BACKLOG = 2048
# Registrations carry a child controller's whole model list, so not tiny.
DEFAULT_MAX_CONTROL_BODY_SIZE = 1024 * 1024
DEFAULT_MAX_MODELS_PER_WORKER = 1024
DEFAULT_MAX_WORKERS = 10_000
DEFAULT_MAX_WORKERS_PER_SOURCE = 1000
# Client connections: a request head, a body and a keep-alive wait are each bounded in
# time; connections are bounded in number, in all and from one source address.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 256
# Connections to workers, all together (relayed requests, status probes and load polls).
DEFAULT_MAX_WORKER_CONNECTIONS = 1024
# A worker's answer to a single-document call (/worker_generate, embeddings) and the bytes
# all relays may hold at once.
DEFAULT_MAX_WORKER_ANSWER_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_BUFFERED_BYTES = 1024 * 1024 * 1024
DEFAULT_STREAM_ATTEMPTS = 3
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_LOAD_POLL_INTERVAL = 1.0
# FastChat's model worker runs 5 requests at once unless --limit-worker-concurrency says
# otherwise.
DEFAULT_WORKER_SLOTS = 5
# Typed as the field is, so that attrs' stubs accept the optional validator with it.
_DEFAULT_SLOTS: int | None = DEFAULT_WORKER_SLOTS
DEFAULT_PARENT_HEART_BEAT_INTERVAL = 45.0
DEFAULT_DECISION_LOG_SIZE = 100
DEFAULT_EJECTION_BASE = 5.0
DEFAULT_EJECTION_MAX = 300.0


#: the registry kept in this process only (the default; no Redis)
MEMORY_REGISTRY = "memory"
_REDIS_SCHEMES = ("redis", "rediss")


def redact_registry(url: str) -> str:
    """``url`` with any password in it replaced by ``***``: what logs and errors show."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_registry(url: str) -> None:
    """:class:`ConfigError` naming the problem unless ``url`` is ``memory`` or a usable
    ``redis://HOST[:PORT][/DB]`` or ``rediss://`` URL (the message never shows a password)."""
    if url == MEMORY_REGISTRY:
        return
    shown = redact_registry(url)
    example = "'memory' or a URL such as redis://10.0.0.5:6379/0 (rediss:// for TLS)"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"registry must be {example}, got {shown!r}: {e}") from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(f"registry must be {example}, got {shown!r}")
    if not parts.hostname:
        raise ConfigError(f"registry {shown!r} names no host")
    if port == 0:
        raise ConfigError(f"registry {shown!r}: the port must be from 1 to 65535")
    db = parts.path.strip("/")
    if db and (not db.isdigit() or not db.isascii()):
        raise ConfigError(f"registry {shown!r}: the database must be a number, got {db!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"registry {shown!r}: no query or fragment is understood")


def _registry(inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"registry must be a string, got {type(value).__name__}")
    check_registry(value)


_T = TypeVar("_T")
#: an attrs validator of a field of type ``_T``
_Validator = Callable[[Any, "attrs.Attribute[_T]", _T], None]


def _seconds(*, zero: bool) -> _Validator[float]:
    """A validator for a finite number of seconds, positive (or also 0 if ``zero``)."""
    expected = "0 or a positive number" if zero else "a positive number of seconds"

    def check(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{attribute.name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ConfigError(f"{attribute.name} must be {expected}, got {value!r}")

    return check


_positive = _seconds(zero=False)
_non_negative = _seconds(zero=True)


def _log_size(inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise ConfigError(f"{attribute.name} must be an integer from 0 to 100000, got {value!r}")


def _optional_url(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(
            f"{attribute.name} must be a URL such as 'http://10.0.0.1:21001', got {value!r}"
        )


def _parent_urls(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    # One parent, or several (replicas of one logical parent) separated by commas.
    if value is None:
        return
    try:
        controller_addresses(value, attribute.name)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _optional_slots(inst: Any, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise ConfigError(f"worker_slots must be an integer of at least 1, got {value!r}")


def _integer(low: int, high: int | None = None, unit: str = "") -> _Validator[int]:
    """A validator for a whole number from ``low`` (to ``high``, if given)."""
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def check(inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise ConfigError(f"{attribute.name} must be an integer {bounds}{unit}, got {value!r}")

    return check


_port = _integer(0, 65535)
_body_size = _integer(1024, unit=" bytes")
_backlog = _integer(1, 65535)
_byte_count = _integer(1, unit=" bytes")
_attempts = _integer(1, 100)


def _dispatch(value: DispatchMethod | str) -> DispatchMethod:
    if isinstance(value, DispatchMethod):
        return value
    try:
        return DispatchMethod.from_str(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _networks(values: Any) -> tuple[IPNetwork, ...]:
    """CIDR blocks given as strings or networks (``ConfigError`` for anything else)."""
    return parse_networks([str(v) for v in values], "worker_networks")


@attrs.frozen(kw_only=True)
class ControllerConfig:
    """Everything that decides how a controller behaves.

    Times are in seconds. ``port=0`` asks the OS for a free port (see ``Controller.url``).
    Build one directly when embedding, or let ``controller.cli`` build it from flags and
    ``FASTCHAT_*`` environment variables.
    """

    host: str = DEFAULT_HOST
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    dispatch_method: DispatchMethod = attrs.field(
        default=DispatchMethod.LEAST_TIME, converter=_dispatch
    )
    #: a worker registered with ``check_heart_beat`` that stays silent this long is dropped
    heart_beat_expiration: float = attrs.field(
        default=DEFAULT_HEART_BEAT_EXPIRATION, validator=_positive
    )
    #: the longest silence tolerated between two reads of a worker's stream
    worker_api_timeout: float = attrs.field(default=DEFAULT_WORKER_API_TIMEOUT, validator=_positive)
    #: bound on each ``/worker_get_status`` probe and on connecting to a worker
    status_probe_timeout: float = attrs.field(
        default=DEFAULT_STATUS_PROBE_TIMEOUT, validator=_positive
    )
    #: request bodies larger than this get HTTP 413
    max_body_size: int = attrs.field(default=DEFAULT_MAX_BODY_SIZE, validator=_body_size)
    #: request bodies of the control endpoints (register, heartbeat, dispatch, listings,
    #: refresh, status) larger than this get HTTP 413
    max_control_body_size: int = attrs.field(
        default=DEFAULT_MAX_CONTROL_BODY_SIZE, validator=_body_size
    )
    #: registrations held at once, and made from one source address; past them 503
    max_workers: int = attrs.field(default=DEFAULT_MAX_WORKERS, validator=_integer(1))
    max_workers_per_source: int = attrs.field(
        default=DEFAULT_MAX_WORKERS_PER_SOURCE, validator=_integer(1)
    )
    #: model names one registration or status answer may carry
    max_models_per_worker: int = attrs.field(
        default=DEFAULT_MAX_MODELS_PER_WORKER, validator=_integer(1, 1_000_000)
    )
    #: the listening socket's accept queue
    backlog: int = attrs.field(default=DEFAULT_BACKLOG, validator=_backlog)
    #: a request head must be complete within this (from the connection's first byte of
    #: it, or from the connection's start), a whole body within ``body_timeout`` of its
    #: head, and a kept-alive connection may wait ``idle_timeout`` for its next request
    header_timeout: float = attrs.field(default=DEFAULT_HEADER_TIMEOUT, validator=_positive)
    body_timeout: float = attrs.field(default=DEFAULT_BODY_TIMEOUT, validator=_positive)
    idle_timeout: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT, validator=_positive)
    #: client connections held at once (idle ones are closed to make room), and from one
    #: source address
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_integer(1))
    max_connections_per_source: int = attrs.field(
        default=DEFAULT_MAX_CONNECTIONS_PER_SOURCE, validator=_integer(1)
    )
    #: connections to workers held open at once, all together
    max_worker_connections: int = attrs.field(
        default=DEFAULT_MAX_WORKER_CONNECTIONS, validator=_integer(2)
    )
    #: a worker's answer to a single-document call larger than this is refused
    max_worker_answer_size: int = attrs.field(
        default=DEFAULT_MAX_WORKER_ANSWER_SIZE, validator=_byte_count
    )
    #: bytes all relays may hold at once (messages not yet written, single-document answers)
    max_buffered_bytes: int = attrs.field(default=DEFAULT_MAX_BUFFERED_BYTES, validator=_byte_count)
    #: how many workers a stream may be tried on before its first byte reaches the client
    stream_attempts: int = attrs.field(default=DEFAULT_STREAM_ATTEMPTS, validator=_attempts)
    #: how long a worker that failed a relayed request is kept out of rotation; doubles
    #: with each further failure in a row, up to ``ejection_max``
    ejection_base: float = attrs.field(default=DEFAULT_EJECTION_BASE, validator=_positive)
    ejection_max: float = attrs.field(default=DEFAULT_EJECTION_MAX, validator=_positive)
    #: on shutdown, how long relays in flight may take to finish before they are ended
    drain_timeout: float = attrs.field(default=DEFAULT_DRAIN_TIMEOUT, validator=_positive)
    #: how often busy workers are asked for their queue length (0 turns polling off)
    load_poll_interval: float = attrs.field(
        default=DEFAULT_LOAD_POLL_INTERVAL, validator=_non_negative
    )
    #: how many requests each worker runs at once (FastChat's --limit-worker-concurrency,
    #: 5 unless set); lets the time-based policies see free slots. ``None`` assumes one
    #: at a time.
    worker_slots: int | None = attrs.field(default=_DEFAULT_SLOTS, validator=_optional_slots)
    #: how many recent dispatch decisions /dispatch_decisions can show
    decision_log_size: int = attrs.field(default=DEFAULT_DECISION_LOG_SIZE, validator=_log_size)
    #: register with this parent controller as one worker (hierarchical mode); several
    #: addresses separated by commas: the first that answers, the next when it cannot be reached
    parent_controller: str | None = attrs.field(default=None, validator=_parent_urls)
    #: the URL the parent reaches this controller at; by default ``http(s)://host:port``
    #: (required when embedded, or when listening on every interface)
    advertise_address: str | None = attrs.field(default=None, validator=_optional_url)
    #: seconds between two heartbeats to the parent
    parent_heart_beat_interval: float = attrs.field(
        default=DEFAULT_PARENT_HEART_BEAT_INTERVAL, validator=_positive
    )
    #: where to save the registry as it changes and load it from at start-up (off if None)
    state_file: str | None = None
    #: ``memory`` (this process only) or a Redis URL that replicas share the registry in
    registry: str = attrs.field(default=MEMORY_REGISTRY, validator=_registry, repr=redact_registry)
    #: the Redis password, when not in the URL (from --registry-password-file)
    registry_password: str | None = attrs.field(default=None, repr=False)
    #: the in-band error codes sent to clients (FastChat's unless told otherwise)
    error_profile: ErrorProfile = attrs.field(factory=ErrorProfile.fastchat)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: require client certificates signed by the CA certificates in this file (mutual TLS)
    ssl_client_ca_certs: str | None = None
    #: verify https workers (and the parent) against these CA certificates instead of the
    #: system's trust store
    worker_ca_certs: str | None = None
    #: who may use which endpoint: tokens per role, trusted networks (open by default)
    access: Access = attrs.field(factory=Access)
    #: when not empty, every address a worker's name resolves to must fall inside one of
    #: these networks; otherwise any address but link-local ones (--worker-networks)
    worker_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    #: sent as a bearer token on every request to workers and child controllers
    upstream_token: str | None = attrs.field(default=None, repr=False)
    #: sent as a bearer token on every request to the parent controller
    parent_token: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.ejection_max < self.ejection_base:
            raise ConfigError(
                f"ejection_max ({self.ejection_max!r}) must be at least "
                f"ejection_base ({self.ejection_base!r})"
            )
        if (
            self.parent_controller is not None
            and self.advertise_address is None
            and self.host in ("", "0.0.0.0", "::")
        ):
            raise ConfigError(
                f"listening on {self.host or 'every interface'!r} with a parent controller "
                "needs advertise_address: the URL the parent reaches this controller at"
            )
        if self.shared_registry and self.state_file is not None:
            raise ConfigError(
                "state_file cannot be combined with a Redis registry: the replicas' shared "
                "copy in Redis is what a restarted replica starts from"
            )
        if self.registry_password is not None and not self.shared_registry:
            raise ConfigError("registry_password is only for a Redis registry")
        if self.registry_password is not None and urllib.parse.urlsplit(self.registry).password:
            raise ConfigError("give the Redis password in the registry URL or apart, not both")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("ssl_certfile and ssl_keyfile must be given together")
        if self.ssl_client_ca_certs is not None and self.ssl_certfile is None:
            raise ConfigError(
                "ssl_client_ca_certs (mutual TLS) needs TLS: give ssl_certfile and ssl_keyfile"
            )

    @property
    def sweep_interval(self) -> float:
        """How often expired workers are removed from the registry.

        Routing already ignores an expired worker the moment it expires; the sweep only
        forgets it and logs the removal, at most one second late.
        """
        return min(1.0, self.heart_beat_expiration / 2)

    @property
    def shared_registry(self) -> bool:
        """Whether the registry is shared with other replicas (in Redis)."""
        return self.registry != MEMORY_REGISTRY

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"
