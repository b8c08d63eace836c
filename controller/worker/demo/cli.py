"""The ``fc-demo-worker`` command: flags and environment in, a running demo worker out.

Like ``fc-controller``, this is the only place of the demo that reads ``sys.argv`` or
``os.environ``, configures logging or chooses the event loop.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

from ..config import DEFAULT_HEART_BEAT_INTERVAL, HeartbeatConfig, controller_addresses
from ..config import heart_beat_interval_from_environ as _interval_from_environ
from ..logs import announce
from ..ports import port
from ..runtime import run_main, serve_until_signalled
from ..tokens import check_token, read_token_file
from .app import DemoWorker
from .settings import DemoSettings

__all__ = ["ENV_CONTROLLER_TOKEN", "build_parser", "load_settings", "main"]

#: the token itself (not a path), when --controller-token-file is not given
ENV_CONTROLLER_TOKEN = "FC_CONTROLLER_TOKEN"

log = logging.getLogger(__name__)


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_int_arg(text: str) -> int:
    value = _count_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1, got 0")
    return value


def _float_arg(text: str, expected: str, bounds: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
    return value


def _seconds_arg(text: str) -> float:
    return _float_arg(
        text, "a number of seconds", "at least 0", lambda v: math.isfinite(v) and v >= 0
    )


def _rate_arg(text: str) -> float:
    return _float_arg(text, "a number from 0 to 1", "from 0 to 1", lambda v: 0 <= v <= 1)


def _names_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``fc-demo-worker`` flags (FastChat's model_worker names where they overlap)."""
    parser = argparse.ArgumentParser(
        prog="fc-demo-worker",
        description="A FastChat-compatible model worker that streams made-up words.",
    )
    add = parser.add_argument
    add("--host", default="localhost", help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=port,
        default=21002,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    add(
        "--backlog",
        type=_positive_int_arg,
        default=2048,
        metavar="N",
        help="the listening socket's accept queue (default: %(default)s)",
    )
    add(
        "--worker-address",
        default=None,
        metavar="URL",
        help="the URL the controller uses to reach this worker (default: http://HOST:PORT)",
    )
    add(
        "--controller-address",
        default="http://localhost:21001",
        metavar="URL[,URL...]",
        help="the controller to register with and send heartbeats to; give it for a "
        "controller on another host or port; several comma-separated URLs (replicas): the "
        "first that answers, the next when it cannot be reached (default: %(default)s)",
    )
    add(
        "--controller-token-file",
        default=None,
        metavar="PATH",
        help="send the token in PATH to the controller as a bearer token (env "
        f"{ENV_CONTROLLER_TOKEN} holding the token; default: none)",
    )
    add(
        "--model-names",
        type=_names_arg,
        default=["demo-model"],
        metavar="NAMES",
        help="comma-separated model names to serve (default: demo-model)",
    )
    add(
        "--conv-template",
        default="demo",
        metavar="NAME",
        help="name of the conversation template it reports (default: %(default)s)",
    )
    add(
        "--limit-worker-concurrency",
        type=_positive_int_arg,
        default=5,
        metavar="N",
        help="generations run at once; more wait in its queue (default: %(default)s)",
    )
    add(
        "--stream-interval",
        type=_positive_int_arg,
        default=1,
        metavar="N",
        help="tokens per message (default: %(default)s)",
    )
    add("--no-register", action="store_true", help="do not register with the controller")
    add("--multimodal", action="store_true", help="register as a multimodal worker")
    add(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for --error-rate (default: none, a different choice every run)",
    )
    knobs = parser.add_argument_group("misbehaviour")
    knobs.add_argument(
        "--token-delay",
        type=_seconds_arg,
        metavar="SECONDS",
        default=0.05,
        help="seconds per token (default: 0.05)",
    )
    knobs.add_argument(
        "--first-token-delay",
        type=_seconds_arg,
        default=0.0,
        metavar="SECONDS",
        help="extra seconds before the first token (default: 0)",
    )
    knobs.add_argument(
        "--max-new-tokens-limit",
        type=_count_arg,
        default=1024,
        metavar="N",
        help="cap on a request's max_new_tokens (default: 1024)",
    )
    knobs.add_argument(
        "--context-length",
        type=_positive_int_arg,
        default=4096,
        metavar="N",
        help="the context length /model_details reports (default: %(default)s)",
    )
    knobs.add_argument(
        "--hang-after",
        type=_count_arg,
        default=None,
        metavar="N",
        help="after N tokens stop sending but keep the connection open (default: never)",
    )
    knobs.add_argument(
        "--fail-after",
        type=_count_arg,
        default=None,
        metavar="N",
        help="after N tokens drop the connection (default: never)",
    )
    knobs.add_argument(
        "--error-rate",
        type=_rate_arg,
        default=0.0,
        metavar="P",
        help="answer this share of generations with an in-band error, from 0 to 1 "
        "(default: %(default)g)",
    )
    add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log to stderr (default: %(default)s)",
    )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[DemoSettings, str]:
    """Settings and log level from flags and ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        interval = _interval_from_environ(env)
        token = _controller_token(args.controller_token_file, env)
        settings = DemoSettings(
            host=args.host,
            port=args.port,
            backlog=args.backlog,
            worker_address=args.worker_address,
            controller_address=args.controller_address,
            controller_token=token,
            register=not args.no_register,
            model_names=args.model_names,
            multimodal=args.multimodal,
            conv_template=args.conv_template,
            limit_worker_concurrency=args.limit_worker_concurrency,
            stream_interval=args.stream_interval,
            token_delay=args.token_delay,
            first_token_delay=args.first_token_delay,
            max_new_tokens_limit=args.max_new_tokens_limit,
            context_length=args.context_length,
            hang_after=args.hang_after,
            fail_after=args.fail_after,
            error_rate=args.error_rate,
            seed=args.seed,
            heart_beat_interval=DEFAULT_HEART_BEAT_INTERVAL if interval is None else interval,
        )
        if settings.register:
            # Fail at start-up, not in the background, on a malformed address.
            controller_addresses(settings.controller_address, "--controller-address")
            HeartbeatConfig(
                controller_address=settings.controller_address,
                worker_address=settings.worker_address or "http://localhost",
                model_names=settings.model_names,
            )
    except ValueError as e:
        parser.error(str(e))
    return settings, args.log_level


def _controller_token(path: str | None, environ: Mapping[str, str]) -> str | None:
    if path is not None:
        return read_token_file(path)
    raw = environ.get(ENV_CONTROLLER_TOKEN, "").strip()
    return check_token(raw, f"environment variable {ENV_CONTROLLER_TOKEN}") if raw else None


async def _run(settings: DemoSettings) -> int:
    def started(worker: DemoWorker) -> None:
        announce(log, f"fc-demo-worker running on {worker.url} (Press CTRL+C to quit)")
        log.info(
            "Serving %s as %s; %s",
            ", ".join(settings.model_names),
            worker.worker_address,
            f"controller {settings.controller_address}" if settings.register else "not registering",
        )

    async def start() -> DemoWorker:
        worker = DemoWorker(settings)
        await worker.start()
        return worker

    where = f"{settings.host}:{settings.port}"
    # Only a registered worker has a controller to leave.
    stopping = "leaving the controller and stopping" if settings.register else "stopping"
    return await serve_until_signalled(start, started, where, log, stopping)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run a demo worker until SIGINT or SIGTERM; returns the process exit status."""
    settings, level = load_settings(argv, environ)
    return run_main(_run(settings), level)
