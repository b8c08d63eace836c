"""The flags of the controller's limits: sizes, counts, time bounds and the accept queue."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .arg_types import seconds, size, whole_number
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
    DEFAULT_MAX_CONTROL_BODY_SIZE,
    DEFAULT_MAX_MODELS_PER_WORKER,
    DEFAULT_MAX_WORKER_ANSWER_SIZE,
    DEFAULT_MAX_WORKER_CONNECTIONS,
    DEFAULT_MAX_WORKERS,
    DEFAULT_MAX_WORKERS_PER_SOURCE,
)

__all__ = ["add_limit_flags"]

#: the limits' flags: (flag, value type, default, metavar, help)
_LIMITS: tuple[tuple[str, Callable[[str], float], float, str, str], ...] = (
    (
        "--max-control-body-size",
        size,
        DEFAULT_MAX_CONTROL_BODY_SIZE,
        "BYTES",
        "larger request bodies of the control endpoints (register, heartbeat, "
        "get_worker_address, the listings, refresh, status) get HTTP 413 (default: 1MiB)",
    ),
    (
        "--max-body-size",
        size,
        DEFAULT_MAX_BODY_SIZE,
        "BYTES",
        "bodies of generations and other worker calls larger than this get HTTP 413; "
        "suffixes KiB, MiB and GiB are accepted (default: 64MiB)",
    ),
    (
        "--max-worker-answer-size",
        size,
        DEFAULT_MAX_WORKER_ANSWER_SIZE,
        "BYTES",
        "a worker's answer to /worker_generate, /worker_get_embeddings and the other "
        "single-document calls larger than this is refused with the worker error "
        "(default: 64MiB)",
    ),
    (
        "--max-buffered-bytes",
        size,
        DEFAULT_MAX_BUFFERED_BYTES,
        "BYTES",
        "bytes all relays may hold at once; a stream over it stops reading from its "
        "worker until it frees, a single-document answer that does not fit fails "
        "(default: 1GiB)",
    ),
    (
        "--max-models-per-worker",
        whole_number(1, 1_000_000),
        DEFAULT_MAX_MODELS_PER_WORKER,
        "N",
        "model names one registration or status answer may carry; more is refused "
        f"(default: {DEFAULT_MAX_MODELS_PER_WORKER})",
    ),
    (
        "--max-workers",
        whole_number(1),
        DEFAULT_MAX_WORKERS,
        "N",
        "registrations held at once; a new one past it gets HTTP 503 with Retry-After "
        f"(default: {DEFAULT_MAX_WORKERS})",
    ),
    (
        "--max-workers-per-source",
        whole_number(1),
        DEFAULT_MAX_WORKERS_PER_SOURCE,
        "N",
        "registrations made from one source address; a new one past it gets HTTP 503 "
        f"(default: {DEFAULT_MAX_WORKERS_PER_SOURCE})",
    ),
    (
        "--header-timeout",
        seconds,
        DEFAULT_HEADER_TIMEOUT,
        "SECONDS",
        "a client's request head (request line and headers) must be complete within this, "
        "however slowly it trickles in; else the connection is closed "
        f"(default: {DEFAULT_HEADER_TIMEOUT:g})",
    ),
    (
        "--body-timeout",
        seconds,
        DEFAULT_BODY_TIMEOUT,
        "SECONDS",
        "a request body must arrive whole within this after its head; else HTTP 408 and "
        f"the connection is closed (default: {DEFAULT_BODY_TIMEOUT:g})",
    ),
    (
        "--idle-timeout",
        seconds,
        DEFAULT_IDLE_TIMEOUT,
        "SECONDS",
        "a kept-alive client connection waiting this long for its next request is closed "
        f"(default: {DEFAULT_IDLE_TIMEOUT:g})",
    ),
    (
        "--max-connections",
        whole_number(1),
        DEFAULT_MAX_CONNECTIONS,
        "N",
        "client connections held at once; at the cap the oldest idle one (or one still "
        "sending its head) is closed to make room, and a new one is refused with HTTP 503 "
        f"only when every one has a request in progress (default: {DEFAULT_MAX_CONNECTIONS})",
    ),
    (
        "--max-connections-per-source",
        whole_number(1),
        DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        "N",
        "client connections from one source address; a new one past it is refused with "
        f"HTTP 503 and closed (default: {DEFAULT_MAX_CONNECTIONS_PER_SOURCE})",
    ),
    (
        "--max-worker-connections",
        whole_number(2),
        DEFAULT_MAX_WORKER_CONNECTIONS,
        "N",
        "connections to workers held open at once, all together (an eighth of them for "
        "status probes and load polls); past it a request waits for one, up to "
        f"--status-probe-timeout (default: {DEFAULT_MAX_WORKER_CONNECTIONS})",
    ),
    (
        "--backlog",
        whole_number(1, 65535),
        DEFAULT_BACKLOG,
        "N",
        "the listening socket's accept queue: connections the kernel holds before the "
        f"controller accepts them (default: {DEFAULT_BACKLOG})",
    ),
)


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, metavar, text in _LIMITS:
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
