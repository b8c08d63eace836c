"""The ``fc-controller`` command: flags and environment in, a running controller out.

This is the only module that reads ``sys.argv`` or ``os.environ``, configures logging or
chooses the event loop. Precedence for every setting: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import __version__
from .app import Controller
from .config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEART_BEAT_EXPIRATION,
    DEFAULT_HOST,
    DEFAULT_LOAD_POLL_INTERVAL,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_PARENT_HEART_BEAT_INTERVAL,
    DEFAULT_PORT,
    DEFAULT_STATUS_PROBE_TIMEOUT,
    DEFAULT_STREAM_ATTEMPTS,
    DEFAULT_WORKER_API_TIMEOUT,
    DEFAULT_WORKER_SLOTS,
    ControllerConfig,
)
from .errors import ConfigError
from .models import DispatchMethod, ErrorProfile
from .worker.runtime import loop_factory, run_until_signalled

__all__ = ["build_parser", "load_config", "main"]

log = logging.getLogger("controller")

ENV_EXPIRATION = "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"
ENV_API_TIMEOUT = "FASTCHAT_WORKER_API_TIMEOUT"
ENV_WORKER_INTERVAL = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"
ENV_SSL_KEYFILE = "SSL_KEYFILE"
ENV_SSL_CERTFILE = "SSL_CERTFILE"

LOG_LEVELS = ("debug", "info", "warning", "error")
PROFILES = ("fastchat", "tinychat")
TINYCHAT_HEART_BEAT_EXPIRATION = 30.0


def _seconds(text: str) -> float:
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
    return _seconds(text)


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
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"drop a worker silent for this long (env {ENV_EXPIRATION}; default "
        f"{DEFAULT_HEART_BEAT_EXPIRATION:g}, or {TINYCHAT_HEART_BEAT_EXPIRATION:g} with "
        "--profile tinychat)",
    )
    parser.add_argument(
        "--worker-api-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"longest silence allowed between two reads of a worker's stream "
        f"(env {ENV_API_TIMEOUT}; default {DEFAULT_WORKER_API_TIMEOUT:g})",
    )
    parser.add_argument(
        "--status-probe-timeout",
        type=_seconds,
        default=DEFAULT_STATUS_PROBE_TIMEOUT,
        metavar="SECONDS",
        help="bound on each /worker_get_status probe of a worker and on connecting to one "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--max-body-size",
        type=_size,
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="BYTES",
        help="request bodies larger than this get HTTP 413; suffixes KiB, MiB and GiB are "
        "accepted (default: 64MiB)",
    )
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
        type=_seconds,
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
        type=_seconds,
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
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="how much to log to stderr (default: %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _from_env(
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


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ControllerConfig, str]:
    """Build the configuration and the log level from flags and environment.

    Exits with status 2 and a message naming the flag or variable when one is invalid.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    expiration = args.heart_beat_expiration
    if expiration is None:
        tinychat = args.profile == "tinychat"
        default = TINYCHAT_HEART_BEAT_EXPIRATION if tinychat else DEFAULT_HEART_BEAT_EXPIRATION
        expiration = _from_env(parser, env, ENV_EXPIRATION, _seconds, default)
    api_timeout = args.worker_api_timeout
    if api_timeout is None:
        api_timeout = _from_env(parser, env, ENV_API_TIMEOUT, _seconds, DEFAULT_WORKER_API_TIMEOUT)
    parent_interval = args.parent_heart_beat_interval
    if parent_interval is None:
        parent_interval = _from_env(
            parser, env, ENV_WORKER_INTERVAL, _seconds, DEFAULT_PARENT_HEART_BEAT_INTERVAL
        )
    for flag, value in (
        ("--parent-controller", args.parent_controller),
        ("--advertise-address", args.advertise_address),
    ):
        if value is not None and not value.startswith(("http://", "https://")):
            parser.error(f"{flag} must be a URL such as http://10.0.0.1:21001, got {value!r}")
    certfile = keyfile = None
    if args.ssl:
        keyfile, certfile = env.get(ENV_SSL_KEYFILE), env.get(ENV_SSL_CERTFILE)
        named = ((ENV_SSL_KEYFILE, keyfile), (ENV_SSL_CERTFILE, certfile))
        missing = [name for name, value in named if not value]
        if missing:
            parser.error(
                f"--ssl needs the environment variables {ENV_SSL_KEYFILE} and "
                f"{ENV_SSL_CERTFILE} set to the key and certificate files; "
                f"not set: {', '.join(missing)}"
            )
        for name, path in ((ENV_SSL_KEYFILE, keyfile), (ENV_SSL_CERTFILE, certfile)):
            if not os.path.isfile(str(path)):
                parser.error(f"{name}={path!r} is not a readable file")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(certfile), str(keyfile)
            )
        except (OSError, ssl.SSLError) as e:
            parser.error(
                f"cannot load {ENV_SSL_CERTFILE}={certfile!r} "
                f"with {ENV_SSL_KEYFILE}={keyfile!r}: {e}"
            )
    try:
        config = ControllerConfig(
            host=args.host,
            port=args.port,
            dispatch_method=args.dispatch_method,
            heart_beat_expiration=expiration,
            worker_api_timeout=api_timeout,
            status_probe_timeout=args.status_probe_timeout,
            max_body_size=args.max_body_size,
            stream_attempts=args.stream_attempts,
            drain_timeout=args.drain_timeout,
            state_file=args.state_file,
            load_poll_interval=args.load_poll_interval,
            worker_slots=args.worker_slots,
            parent_controller=args.parent_controller,
            advertise_address=args.advertise_address,
            parent_heart_beat_interval=parent_interval,
            error_profile=(
                ErrorProfile.tinychat() if args.profile == "tinychat" else ErrorProfile.fastchat()
            ),
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
    except ConfigError as e:
        parser.error(str(e))
    return config, args.log_level


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        stream=sys.stderr,
    )
    # aiohttp's own access log would be one line per request: never wanted at INFO here.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def _run(config: ControllerConfig) -> int:
    return await run_until_signalled(lambda stop: _serve_until(stop, config), log, "shutting down")


async def _serve_until(stop: asyncio.Event, config: ControllerConfig) -> int:
    try:
        controller = await Controller.serve(config)
    except OSError as e:
        log.error("Cannot listen on %s:%d: %s", config.host, config.port, e)
        return 1
    try:
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
        await stop.wait()
    finally:
        await controller.aclose()
    log.info("Stopped")
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the controller until SIGINT or SIGTERM; returns the process exit status."""
    config, level = load_config(argv, environ)
    _configure_logging(level)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_run(config))
