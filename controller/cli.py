"""The ``fc-controller`` command: flags, environment and configuration file in, a running
controller out.

This is the only module that reads ``sys.argv`` or ``os.environ``, configures logging or
chooses the event loop. Precedence for every setting: flag, then environment, then the
configuration file, then default.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

import attrs

from . import status_cli
from .access_flags import access_settings
from .config import (
    DEFAULT_HEART_BEAT_EXPIRATION,
    DEFAULT_PARENT_HEART_BEAT_INTERVAL,
    DEFAULT_WORKER_API_TIMEOUT,
    ControllerConfig,
)
from .config_file import apply_config_file
from .decisions.models import ErrorProfile
from .errors import ConfigError
from .options import (
    ENV_API_TIMEOUT,
    ENV_EXPIRATION,
    ENV_WORKER_INTERVAL,
    TINYCHAT_HEART_BEAT_EXPIRATION,
    Parser,
    build_parser,
    env_name,
    from_env,
    given_flags,
    own_environment,
    seconds,
)
from .registry_flags import registry_settings
from .requestid import RequestIdFilter
from .server import Controller
from .startup import startup_line
from .upkeep.collector import FullCollections
from .worker.logs import announce
from .worker.runtime import run_main, serve_until_signalled

__all__ = ["Loaded", "build_parser", "load", "load_config", "main"]

log = logging.getLogger("controller")

#: the settings whose flag's destination is the config field's own name
_SAME_NAMED = (
    "host",
    "port",
    "backlog",
    "header_timeout",
    "body_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_source",
    "max_worker_connections",
    "dispatch_method",
    "status_probe_timeout",
    "max_body_size",
    "max_control_body_size",
    "max_models_per_worker",
    "max_workers",
    "max_workers_per_source",
    "max_worker_answer_size",
    "max_buffered_bytes",
    "stream_attempts",
    "drain_timeout",
    "state_file",
    "load_poll_interval",
    "worker_slots",
    "parent_controller",
    "advertise_address",
)


@attrs.frozen
class Loaded:
    """What the command line, the environment and the configuration file decided."""

    config: ControllerConfig
    log_level: str
    log_format: str
    profile: str
    #: the configuration file read, if any
    config_file: str | None


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ControllerConfig, str]:
    """The configuration and the log level (see :func:`load`)."""
    loaded = load(argv, environ)
    return loaded.config, loaded.log_level


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Loaded:
    """Build the configuration from flags, environment and configuration file.

    Exits with status 2 and a message naming the flag, variable or file key when one is
    invalid (one JSON line with ``--log-format json``).
    """
    parser = build_parser()
    env = os.environ if environ is None else environ
    words = sys.argv[1:] if argv is None else list(argv)
    # Before parsing, the words themselves tell: JSON errors from the first one on.
    parser.json_errors = "json" in (
        env.get(env_name("log_format")),
        *(b for a, b in itertools.pairwise(words) if a == "--log-format"),
        *(a.removeprefix("--log-format=") for a in words if a.startswith("--log-format=")),
    )
    args = parser.parse_args(words)
    given = given_flags(words)
    _errors_as_wanted(parser, args, given, env)
    config_file = apply_config_file(parser, args, given, env)
    _errors_as_wanted(parser, args, given, env)
    own_environment(parser, None, args, env, given)
    expiration = args.heart_beat_expiration
    if expiration is None:
        tinychat = args.profile == "tinychat"
        default = TINYCHAT_HEART_BEAT_EXPIRATION if tinychat else DEFAULT_HEART_BEAT_EXPIRATION
        expiration = from_env(parser, env, ENV_EXPIRATION, seconds, default)
    api_timeout = args.worker_api_timeout
    if api_timeout is None:
        api_timeout = from_env(parser, env, ENV_API_TIMEOUT, seconds, DEFAULT_WORKER_API_TIMEOUT)
    parent_interval = args.parent_heart_beat_interval
    if parent_interval is None:
        parent_interval = from_env(
            parser, env, ENV_WORKER_INTERVAL, seconds, DEFAULT_PARENT_HEART_BEAT_INTERVAL
        )
    for flag, value in (
        ("--parent-controller", args.parent_controller),
        ("--advertise-address", args.advertise_address),
    ):
        if value is not None and not value.startswith(("http://", "https://")):
            parser.error(f"{flag} must be a URL such as http://10.0.0.1:21001, got {value!r}")
    try:
        same = {name: getattr(args, name) for name in _SAME_NAMED}
        config = ControllerConfig(
            **same,
            heart_beat_expiration=expiration,
            worker_api_timeout=api_timeout,
            parent_heart_beat_interval=parent_interval,
            error_profile=(
                ErrorProfile.tinychat() if args.profile == "tinychat" else ErrorProfile.fastchat()
            ),
            **access_settings(parser, args, env),
            **registry_settings(parser, args),
        )
    except ConfigError as e:
        parser.error(_as_flags(str(e), parser))
    return Loaded(config, args.log_level, args.log_format, args.profile, config_file)


def _errors_as_wanted(
    parser: Parser, args: argparse.Namespace, given: set[str], env: Mapping[str, str]
) -> None:
    """Make the parser's errors JSON if the log format is (flag, else environment, else
    what ``args`` holds so far)."""
    wanted = args.log_format
    if "log_format" not in given:
        wanted = env.get(env_name("log_format")) or wanted
    parser.json_errors = wanted == "json"


def _as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A configuration error as the command line says it: ``advertise_address`` is
    ``--advertise-address`` (names with ``_`` only, so no ordinary word is taken)."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if "_" in a.dest}
    return re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: flags.get(m[0], m[0]), message)


def settle_heap() -> int:
    """Set what start-up built (modules, the app, a restored registry) aside from the
    garbage collector's full collections, which otherwise walk it every time: about half
    of each pause, 50-75 ms with a thousand requests in flight (see docs/performance.md).
    Returns how many objects were set aside."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%d start-up objects set aside from the garbage collector's passes", frozen)
    return frozen


async def _run(loaded: Loaded) -> int:
    config = loaded.config
    full_collections = FullCollections()

    def started(controller: Controller) -> None:
        log.info(
            "Dispatch %s, heartbeat expiration %g s, worker API timeout %g s",
            config.dispatch_method.value,
            config.heart_beat_expiration,
            config.worker_api_timeout,
        )
        # Deployment scripts wait for this line (FastChat's printed Uvicorn's equivalent).
        announce(log, startup_line(controller.url, config, loaded.profile, loaded.config_file))
        settle_heap()
        full_collections.start()

    async def start() -> Controller:
        return await Controller.serve(config)

    where = f"{config.host}:{config.port}"
    try:
        return await serve_until_signalled(start, started, where, log, "shutting down")
    finally:
        await full_collections.stop()


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the controller until SIGINT or SIGTERM; returns the process exit status.

    ``fc-controller status ...`` instead prints a running controller's workers (see
    ``controller.status_cli``); every other command line starts a controller.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:
        return status_cli.main(args[1:], environ)
    loaded = load(args, environ)
    # aiohttp's own access log would be one line per request: never wanted at INFO here.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return run_main(_run(loaded), loaded.log_level, loaded.log_format, [RequestIdFilter()])
