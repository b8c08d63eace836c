"""The ``fc-controller`` command: flags and environment in, a running controller out.

This is the only module that reads ``sys.argv`` or ``os.environ``, configures logging or
chooses the event loop. Precedence for every setting: flag, then environment, then default.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

from . import status_cli
from .access_flags import access_settings
from .config import (
    DEFAULT_HEART_BEAT_EXPIRATION,
    DEFAULT_PARENT_HEART_BEAT_INTERVAL,
    DEFAULT_WORKER_API_TIMEOUT,
    ControllerConfig,
)
from .decisions.models import ErrorProfile
from .errors import ConfigError
from .options import (
    ENV_API_TIMEOUT,
    ENV_EXPIRATION,
    ENV_WORKER_INTERVAL,
    TINYCHAT_HEART_BEAT_EXPIRATION,
    build_parser,
    from_env,
    own_environment,
    seconds,
)
from .registry_flags import registry_settings
from .server import Controller
from .worker.runtime import run_main, serve_until_signalled

__all__ = ["build_parser", "load_config", "main"]

log = logging.getLogger("controller")

#: the settings whose flag's destination is the config field's own name
_SAME_NAMED = (
    "host",
    "port",
    "backlog",
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


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ControllerConfig, str]:
    """Build the configuration and the log level from flags and environment.

    Exits with status 2 and a message naming the flag or variable when one is invalid.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    own_environment(parser, None if argv is None else list(argv), args, env)
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
        parser.error(str(e))
    return config, args.log_level


async def _run(config: ControllerConfig) -> int:
    def announce(controller: Controller) -> None:
        log.info(
            "Dispatch %s, heartbeat expiration %g s, worker API timeout %g s",
            config.dispatch_method.value,
            config.heart_beat_expiration,
            config.worker_api_timeout,
        )
        # Deployment scripts wait for this line (FastChat's printed Uvicorn's equivalent).
        print(
            f"fc-controller running on {controller.url} (Press CTRL+C to quit)",
            file=sys.stderr,
            flush=True,
        )

    async def start() -> Controller:
        return await Controller.serve(config)

    where = f"{config.host}:{config.port}"
    return await serve_until_signalled(start, announce, where, log, "shutting down")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the controller until SIGINT or SIGTERM; returns the process exit status.

    ``fc-controller status ...`` instead prints a running controller's workers (see
    ``controller.status_cli``); every other command line starts a controller.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:
        return status_cli.main(args[1:], environ)
    config, level = load_config(args, environ)
    # aiohttp's own access log would be one line per request: never wanted at INFO here.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return run_main(_run(config), level)
