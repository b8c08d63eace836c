"""The command line's flags: the parser, the value types, and how a flag of ours is read
from the environment (``FC_CONTROLLER_`` and the flag's name) when it is not given.

Every setting is a flag of this parser; its environment variable
(:func:`environment_variable`) and configuration file key (:func:`file_key`) are derived
from it, so a flag added here is all three at once."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from typing import Any

from .access_flags import (
    ENV_SSL_CERTFILE,
    ENV_SSL_KEYFILE,
    SPECIAL_VARIABLES,
    add_access_flags,
)
from .arg_types import port, seconds, seconds_or_zero, whole_number
from .config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEART_BEAT_EXPIRATION,
    DEFAULT_HOST,
    DEFAULT_LOAD_POLL_INTERVAL,
    DEFAULT_PARENT_HEART_BEAT_INTERVAL,
    DEFAULT_PORT,
    DEFAULT_STATUS_PROBE_TIMEOUT,
    DEFAULT_STREAM_ATTEMPTS,
    DEFAULT_WORKER_API_TIMEOUT,
    DEFAULT_WORKER_SLOTS,
)
from .decisions.models import DispatchMethod
from .limit_flags import add_limit_flags
from .registry_flags import add_registry_flags
from .version import __version__
from .worker.config import controller_addresses
from .worker.logs import LOG_FORMATS, json_line

__all__ = [
    "ENV_PREFIX",
    "ENV_SSL_CERTFILE",
    "ENV_SSL_KEYFILE",
    "Parser",
    "build_parser",
    "convert_text",
    "env_name",
    "environment_variable",
    "file_key",
    "from_env",
    "given_flags",
    "own_environment",
    "seconds",
    "settings",
]

ENV_EXPIRATION = "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"
ENV_API_TIMEOUT = "FASTCHAT_WORKER_API_TIMEOUT"
ENV_WORKER_INTERVAL = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"

LOG_LEVELS = ("debug", "info", "warning", "error")
PROFILES = ("fastchat", "tinychat")
TINYCHAT_HEART_BEAT_EXPIRATION = 30.0


#: our own flags (those FastChat has no variable for) read ``FC_CONTROLLER_<FLAG>``
ENV_PREFIX = "FC_CONTROLLER_"
#: the flags that read FastChat's variables instead
_FASTCHAT_VARIABLES = {
    "heart_beat_expiration": ENV_EXPIRATION,
    "worker_api_timeout": ENV_API_TIMEOUT,
    "parent_heart_beat_interval": ENV_WORKER_INTERVAL,
}
#: what the command does rather than a setting
_NOT_SETTINGS = frozenset({"help", "version"})
#: flags read from FastChat's variables instead, from variables issue 15 names (see
#: ``controller.access_flags``), or not from the environment at all
_NOT_OURS = frozenset(_FASTCHAT_VARIABLES) | _NOT_SETTINGS | frozenset(SPECIAL_VARIABLES)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


_attempts = whole_number(1, 100)
_slots = whole_number(1)


def _controllers(text: str) -> str:
    """One controller URL or several separated by commas, each checked; the bad one named."""
    try:
        return ",".join(controller_addresses(text, "parent controller"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one JSON line once ``json_errors`` is set
    (``--log-format json``), so that nothing but JSON reaches a log pipeline."""

    json_errors = False

    def error(self, message: str) -> typing.NoReturn:
        if not self.json_errors:
            super().error(message)
        self.exit(2, json_line(f"{self.prog}: error: {message}", logger="controller.cli") + "\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="fc-controller",
        description=(
            "A fast, asyncio-native controller for FastChat and TinyChat model workers. "
            "Each flag may also be set by its environment variable (FC_CONTROLLER_ and the "
            "flag's name, or FastChat's variable where it has one) or by a key in the "
            "--config file (the flag's name with '_' for '-'); a flag wins over the "
            "environment, which wins over the file, which wins over the default."
        ),
        epilog="Every setting, its variable, file key and default: docs/cli.md. "
        "fc-controller status [--controller-address URL] prints the models and "
        "workers of a running controller instead (see fc-controller status --help).",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="read settings from this TOML file; its keys are the long flags' names with "
        "'_' for '-', such as max_body_size = \"64MiB\" (env FC_CONTROLLER_CONFIG; "
        "default: none)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=port, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)"
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
        help=f"drop a worker silent for this long (env {ENV_EXPIRATION}; default: "
        f"{DEFAULT_HEART_BEAT_EXPIRATION:g}, or {TINYCHAT_HEART_BEAT_EXPIRATION:g} with "
        "--profile tinychat)",
    )
    parser.add_argument(
        "--worker-api-timeout",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help=f"longest silence allowed between two reads of a worker's stream "
        f"(env {ENV_API_TIMEOUT}; default: {DEFAULT_WORKER_API_TIMEOUT:g})",
    )
    parser.add_argument(
        "--status-probe-timeout",
        type=seconds,
        default=DEFAULT_STATUS_PROBE_TIMEOUT,
        metavar="SECONDS",
        help="bound on each /worker_get_status probe of a worker and on connecting to one "
        "(default: %(default)g)",
    )
    add_limit_flags(parser)
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
        type=seconds_or_zero,
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
        "with a free slot from one that would queue the request (FastChat's own default; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--parent-controller",
        type=_controllers,
        default=None,
        metavar="URL[,URL...]",
        help="register with this parent controller as one worker offering every model this "
        "controller serves, heartbeat, and withdraw on shutdown (hierarchical mode); given "
        "several comma-separated URLs (replicas of one parent), use the first that answers "
        "and move to the next when it cannot be reached (default: none)",
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
        f"{ENV_WORKER_INTERVAL}; default: {DEFAULT_PARENT_HEART_BEAT_INTERVAL:g})",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="save the registry to PATH as it changes and load it at start-up, so a "
        "restarted controller routes at once (default: off)",
    )
    add_registry_flags(parser)
    add_access_flags(parser)
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="how much to log to stderr (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="'text' for people, or 'json': one JSON object a line (time, level, logger, "
        "message, request_id, exception) for log pipelines (default: %(default)s)",
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


def environment_variable(dest: str) -> str:
    """The environment variable a setting is read from when its flag is not given."""
    return _FASTCHAT_VARIABLES.get(dest) or SPECIAL_VARIABLES.get(dest) or env_name(dest)


def settings(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's settings: every flag but ``--help`` and ``--version``, in order."""
    return [a for a in parser._actions if a.option_strings and a.dest not in _NOT_SETTINGS]


def file_key(action: argparse.Action) -> str | None:
    """A setting's key in the configuration file: its long flag's name with ``_`` for
    ``-`` (``--max-body-size``: ``max_body_size``); ``None`` for ``--config`` itself."""
    if action.dest == "config":
        return None
    flag = next(o for o in action.option_strings if o.startswith("--"))
    return flag.removeprefix("--").replace("-", "_")


def own_environment(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    given: set[str] | None = None,
) -> None:
    """Fill each flag of ours not given on the command line from ``FC_CONTROLLER_<FLAG>``.

    Precedence is flag, then environment, then default; an empty variable counts as unset.
    A bad value exits with status 2 naming the variable, as a bad flag names the flag.
    ``given`` (the destinations given on the command line) is worked out from ``argv``
    unless passed.
    """
    if given is None:
        given = given_flags(argv)
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in _NOT_OURS or dest in given:
            continue
        name = env_name(dest)
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        setattr(args, dest, convert_text(parser, action, f"environment variable {name}", raw))


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags that appear on the command line."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


def convert_text(
    parser: argparse.ArgumentParser, action: argparse.Action, where: str, raw: str
) -> Any:
    """``raw`` as ``action``'s value, from the environment or the configuration file; a bad
    one exits with status 2, the message starting with ``where`` (what holds it)."""
    if action.nargs == 0:  # a switch such as --ssl
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        parser.error(f"{where}: expected true or false, got {raw!r}")
    value: Any = raw
    if action.type is not None:
        try:
            value = action.type(raw)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"{where}: {e}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{where}: expected one of {choices}, got {raw!r}")
    return value
