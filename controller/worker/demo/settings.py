"""The demo worker's settings, ``DemoSettings``: where it listens and how it misbehaves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from ..config import DEFAULT_HEART_BEAT_INTERVAL

__all__ = ["DemoSettings"]


def _nonnegative(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be at least 0, got {value!r}")


def _positive(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be more than 0, got {value!r}")


def _optional_count(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be at least 0, got {value!r}")


def _names(value: Sequence[str]) -> tuple[str, ...]:
    names = tuple(value)
    if not names or not all(names):
        raise ValueError(f"model_names must be one or more non-empty names, got {value!r}")
    return names


@attrs.frozen(kw_only=True)
class DemoSettings:
    """Everything that decides how a demo worker behaves. Times are in seconds."""

    host: str = "localhost"
    #: 0 asks the OS for a free port
    port: int = 21002
    #: the listening socket's accept queue (as fc-controller's --backlog)
    backlog: int = 2048
    #: the URL the controller and clients use to reach this worker; by default
    #: ``http://{host}:{port}`` (``localhost`` for a wildcard host)
    worker_address: str | None = None
    #: the controller to register with, or several separated by commas (see HeartbeatConfig)
    controller_address: str = "http://localhost:21001"
    #: the bearer token sent to a controller that closes its worker role (never shown)
    controller_token: str | None = attrs.field(default=None, repr=False)
    register: bool = True
    model_names: tuple[str, ...] = attrs.field(default=("demo-model",), converter=_names)
    multimodal: bool = False
    conv_template: str = "demo"
    limit_worker_concurrency: int = attrs.field(default=5, validator=_positive)
    #: send a message every this many tokens
    stream_interval: int = attrs.field(default=1, validator=_positive)
    token_delay: float = attrs.field(default=0.05, validator=_nonnegative)
    #: extra delay before the first token, like a long prompt being read
    first_token_delay: float = attrs.field(default=0.0, validator=_nonnegative)
    #: requests asking for more new tokens get this many
    max_new_tokens_limit: int = attrs.field(default=1024, validator=_nonnegative)
    context_length: int = attrs.field(default=4096, validator=_positive)
    embedding_dim: int = attrs.field(default=16, validator=_positive)
    #: stop sending after this many tokens but keep the connection open
    hang_after: int | None = attrs.field(default=None, validator=_optional_count)
    #: drop the connection after this many tokens
    fail_after: int | None = attrs.field(default=None, validator=_optional_count)
    #: the share of generations answered with an in-band error instead
    error_rate: float = attrs.field(default=0.0, validator=_nonnegative)
    #: seeds the choice of which requests fail under ``error_rate``
    seed: int | None = None
    heart_beat_interval: float = attrs.field(
        default=DEFAULT_HEART_BEAT_INTERVAL, validator=_positive
    )
    #: how long stopping waits for requests in flight before cutting them
    shutdown_timeout: float = attrs.field(default=5.0, validator=_nonnegative)

    def __attrs_post_init__(self) -> None:
        if self.error_rate > 1:
            raise ValueError(f"error_rate must be from 0 to 1, got {self.error_rate!r}")
