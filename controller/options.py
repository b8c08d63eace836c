"""The command line's flags: the parser, the value types, and how a flag of ours is read
from the environment (``FC_CONTROLLER_`` and the flag's name) when it is not given."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from . import __version__
from .access_flags import ENV_SSL_CERTFILE, ENV_SSL_KEYFILE, SPECIAL_DESTS, add_access_flags
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEART_BEAT_EXPIRATION,
    DEFAULT_HOST,
    DEFAULT_LOAD_POLL_INTERVAL,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONTROL_BODY_SIZE,
    DEFAULT_MAX_MODELS_PER_WORKER,
    DEFAULT_MAX_WORKER_ANSWER_SIZE,
    DEFAULT_PARENT_HEART_BEAT_INTERVAL,
    DEFAULT_PORT,
    DEFAULT_STATUS_PROBE_TIMEOUT,
    DEFAULT_STREAM_ATTEMPTS,
    DEFAULT_WORKER_API_TIMEOUT,
    DEFAULT_WORKER_SLOTS,
)
from .decisions.models import DispatchMethod

__all__ = [
    "ENV_PREFIX",
    "ENV_SSL_CERTFILE",
    "ENV_SSL_KEYFILE",
    "build_parser",
    "env_name",
    "from_env",
    "own_environment",
    "seconds",
]

ENV_EXPIRATION = "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"
ENV_API_TIMEOUT = "FASTCHAT_WORKER_API_TIMEOUT"
ENV_WORKER_INTERVAL = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"

LOG_LEVELS = ("debug", "info", "warning", "error")
PROFILES = ("fastchat", "tinychat")
TINYCHAT_HEART_BEAT_EXPIRATION = 30.0


#: our own flags (those FastChat has no variable for) read ``FC_CONTROLLER_<FLAG>``
ENV_PREFIX = "FC_CONTROLLER_"
#: flags read from FastChat's variables instead, from variables issue 15 names (see
#: ``controller.access_flags``), or not from the environment at all
_NOT_OURS = (
    frozenset(
        {
            "heart_beat_expiration",
            "worker_api_timeout",
            "parent_heart_beat_interval",
            "help",
            "version",
        }
    )
    | SPECIAL_DESTS
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _seconds_or_zero(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return seconds(text)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number from ``low`` (to ``high``, if given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {value}")
        return value

    return parse


_attempts = _whole_number(1, 100)
_slots = _whole_number(1)


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    try:
        value = int(digits) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes such as 1048576 or 64MiB, got {text!r}"
        ) from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"expected at least 1024 bytes, got {text!r}")
    return value


#: the limits' flags: (flag, value type, default, metavar, help)
_LIMITS: tuple[tuple[str, Callable[[str], int], int, str, str], ...] = (
    (
        "--max-control-body-size",
        _size,
        DEFAULT_MAX_CONTROL_BODY_SIZE,
        "BYTES",
        "larger request bodies of the control endpoints (register, heartbeat, "
        "get_worker_address, the listings, refresh, status) get HTTP 413 (default: 1MiB)",
    ),
    (
        "--max-body-size",
        _size,
        DEFAULT_MAX_BODY_SIZE,
        "BYTES",
        "bodies of generations and other worker calls larger than this get HTTP 413; "
        "suffixes KiB, MiB and GiB are accepted (default: 64MiB)",
    ),
    (
        "--max-worker-answer-size",
        _size,
        DEFAULT_MAX_WORKER_ANSWER_SIZE,
        "BYTES",
        "a worker's answer to /worker_generate, /worker_get_embeddings and the other "
        "single-document calls larger than this is refused with the worker error "
        "(default: 64MiB)",
    ),
    (
        "--max-buffered-bytes",
        _size,
        DEFAULT_MAX_BUFFERED_BYTES,
        "BYTES",
        "bytes all relays may hold at once; a stream over it stops reading from its "
        "worker until it frees, a single-document answer that does not fit fails "
        "(default: 1GiB)",
    ),
    (
        "--max-models-per-worker",
        _whole_number(1, 1_000_000),
        DEFAULT_MAX_MODELS_PER_WORKER,
        "N",
        "model names one registration or status answer may carry; more is refused "
        f"(default: {DEFAULT_MAX_MODELS_PER_WORKER})",
    ),
    (
        "--backlog",
        _whole_number(1, 65535),
        DEFAULT_BACKLOG,
        "N",
        "the listening socket's accept queue: connections the kernel holds before the "
        f"controller accepts them (default: {DEFAULT_BACKLOG})",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fc-controller",
        description=(
            "A fast, asyncio-native controller for FastChat and TinyChat model workers. "
            "Flags take precedence over environment variables, which take precedence "
            "over defaults."
        ),
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--dispatch-method",
        choices=[m.value for m in DispatchMethod],
        default=DispatchMethod.LEAST_TIME.value,
        help="how /get_worker_address picks among the workers serving a model "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ssl",
        action="store_true",
        help=f"serve HTTPS with the key and certificate files named by the {ENV_SSL_KEYFILE} "
        f"and {ENV_SSL_CERTFILE} environment variables",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="fastchat",
        help="the clients to speak to: 'fastchat' (stream error codes 50005/50006) or "
        "'tinychat' (codes 2/3 and a 30 s default heartbeat expiration) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--heart-beat-expiration",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help=f"drop a worker silent for this long (env {ENV_EXPIRATION}; default "
        f"{DEFAULT_HEART_BEAT_EXPIRATION:g}, or {TINYCHAT_HEART_BEAT_EXPIRATION:g} with "
        "--profile tinychat)",
    )
    parser.add_argument(
        "--worker-api-timeout",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help=f"longest silence allowed between two reads of a worker's stream "
        f"(env {ENV_API_TIMEOUT}; default {DEFAULT_WORKER_API_TIMEOUT:g})",
    )
    parser.add_argument(
        "--status-probe-timeout",
        type=seconds,
        default=DEFAULT_STATUS_PROBE_TIMEOUT,
        metavar="SECONDS",
        help="bound on each /worker_get_status probe of a worker and on connecting to one "
        "(default: %(default)g)",
    )
    for flag, kind, default, metavar, text in _LIMITS:
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    parser.add_argument(
        "--stream-attempts",
        type=_attempts,
        default=DEFAULT_STREAM_ATTEMPTS,
        metavar="N",
        help="how many workers a generation may be tried on before its first byte reaches "
        "the client (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=seconds,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long streams in flight may take to finish before they "
        "are ended with the in-band error (default: %(default)g)",
    )
    parser.add_argument(
        "--load-poll-interval",
        type=_seconds_or_zero,
        default=DEFAULT_LOAD_POLL_INTERVAL,
        metavar="SECONDS",
        help="ask workers that got work since their last report for their queue length this "
        "often, to dispatch on fresh numbers between heartbeats; 0 turns it off "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--worker-slots",
        type=_slots,
        default=DEFAULT_WORKER_SLOTS,
        metavar="N",
        help="how many requests each worker runs at once (FastChat workers' "
        "--limit-worker-concurrency), so least_time and power_of_two can tell a worker "
        "with a free slot from one that would queue the request (default: %(default)s, "
        "FastChat's default)",
    )
    parser.add_argument(
        "--parent-controller",
        default=None,
        metavar="URL",
        help="register with this parent controller as one worker offering every model this "
        "controller serves, heartbeat, and withdraw on shutdown (hierarchical mode)",
    )
    parser.add_argument(
        "--advertise-address",
        default=None,
        metavar="URL",
        help="the URL the parent controller reaches this controller at "
        "(default: http(s)://HOST:PORT)",
    )
    parser.add_argument(
        "--parent-heart-beat-interval",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help=f"seconds between two heartbeats to the parent controller (env "
        f"{ENV_WORKER_INTERVAL}; default {DEFAULT_PARENT_HEART_BEAT_INTERVAL:g})",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="save the registry to PATH as it changes and load it at start-up, so a "
        "restarted controller routes at once (default: off)",
    )
    add_access_flags(parser)
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="how much to log to stderr (default: %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def from_env(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    name: str,
    convert: Callable[[str], Any],
    default: Any,
) -> Any:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as e:
        parser.error(f"environment variable {name}: {e}")


def env_name(dest: str) -> str:
    """The environment variable of a flag of ours, e.g. ``FC_CONTROLLER_STATE_FILE``."""
    return ENV_PREFIX + dest.upper()


def own_environment(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    args: argparse.Namespace,
    environ: Mapping[str, str],
) -> None:
    """Fill each flag of ours not given on the command line from ``FC_CONTROLLER_<FLAG>``.

    Precedence is flag, then environment, then default; an empty variable counts as unset.
    A bad value exits with status 2 naming the variable, as a bad flag names the flag.
    """
    given = _given(argv)
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in _NOT_OURS or dest in given:
            continue
        name = env_name(dest)
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        setattr(args, dest, _convert(parser, action, name, raw))


def _given(argv: list[str] | None) -> set[str]:
    """The destinations of the flags that appear on the command line."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str) -> Any:
    if action.nargs == 0:  # a switch such as --ssl
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        parser.error(f"environment variable {name}: expected true or false, got {raw!r}")
    value: Any = raw
    if action.type is not None:
        try:
            value = action.type(raw)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"environment variable {name}: {e}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"environment variable {name}: expected one of {choices}, got {raw!r}")
    return value
