"""The flags of the controller's limits: sizes, counts and the accept queue."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .arg_types import size, whole_number
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONTROL_BODY_SIZE,
    DEFAULT_MAX_MODELS_PER_WORKER,
    DEFAULT_MAX_WORKER_ANSWER_SIZE,
    DEFAULT_MAX_WORKERS,
    DEFAULT_MAX_WORKERS_PER_SOURCE,
)

__all__ = ["add_limit_flags"]

#: the limits' flags: (flag, value type, default, metavar, help)
_LIMITS: tuple[tuple[str, Callable[[str], int], int, str, str], ...] = (
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
