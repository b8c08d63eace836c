"""``fc-controller status``: a running controller's models and workers, as a terminal table.

It reads ``GET /api/workers`` once, with the standard library's HTTP client (a one-shot
command: no event loop to keep free), sending a client-role token when one is given. Any
failure to get an answer is one line on stderr and exit status 1; a bad flag or token is
exit status 2, as for the controller's own flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import NoReturn

from .status_format import parse_workers_document, text_report
from .worker.tokens import authorization, parse_token_line, redact_urls, token_file_lines

__all__ = ["DEFAULT_ADDRESS", "ENV_ADDRESS", "ENV_TOKENS", "main"]

DEFAULT_ADDRESS = "http://localhost:21001"
#: the variable FastChat's first API server read the controller's address from
ENV_ADDRESS = "FASTCHAT_CONTROLLER_URL"
#: the client role's tokens, as the controller reads them (comma-separated)
ENV_TOKENS = "FC_CONTROLLER_API_TOKENS"
#: seconds to wait for the controller to connect and answer
TIMEOUT = 10.0
#: the most of the answer read (10,000 workers are about 3 MB)
MAX_ANSWER = 256 * 1024 * 1024


class Unreachable(Exception):
    """No usable answer from the controller; the message is the one line to print."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fc-controller status",
        description="Print a running controller's models and workers: state, queue "
        "estimate, requests in flight, speed, last heartbeat and failures. Exit status 1 "
        "when the controller cannot be reached or refuses.",
    )
    parser.add_argument(
        "--controller-address",
        default=None,
        metavar="URL",
        help=f"the controller's base URL (env {ENV_ADDRESS}; default: {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--api-token-file",
        default=None,
        metavar="PATH",
        help="send the first token in PATH (the controller's own client token file will do) "
        f"as a bearer token (env {ENV_TOKENS}: the first of its comma-separated tokens; "
        "default: no token)",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Print the table for the controller named by ``argv``/``environ``; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    address = (args.controller_address or env.get(ENV_ADDRESS) or DEFAULT_ADDRESS).rstrip("/")
    if not address.lower().startswith(("http://", "https://")):
        source = "--controller-address" if args.controller_address else ENV_ADDRESS
        parser.error(f"{source} must be a URL such as {DEFAULT_ADDRESS}, got {address!r}")
    try:
        token = _token(args.api_token_file, env)
    except ValueError as e:
        parser.error(str(e))
    shown = redact_urls(address)
    try:
        data = _fetch(f"{address}/api/workers", token, shown)
        about, workers = parse_workers_document(data)
    except (Unreachable, ValueError) as e:
        _fail(f"fc-controller status: {e}")
    sys.stdout.write(text_report(about, workers, shown))
    sys.stdout.flush()
    return 0


def _token(path: str | None, env: Mapping[str, str]) -> str | None:
    """The token to send: the file's first, else the variable's first, else none."""
    if path is not None:
        lines = token_file_lines(path, "--api-token-file")
        where = f"--api-token-file {path}"
    else:
        lines = env.get(ENV_TOKENS, "").split(",")
        where = f"environment variable {ENV_TOKENS}"
    for number, line in enumerate(lines, 1):
        parsed = parse_token_line(line, f"{where}, item {number}")
        if parsed is not None:
            return parsed[1]
    if path is not None:
        raise ValueError(f"--api-token-file: {path!r} holds no token")
    return None


def _fetch(url: str, token: str | None, shown: str) -> object:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    for name, value in authorization(token).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as e:
        raise Unreachable(_refusal(e, shown)) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(f"cannot reach the controller at {shown}: {_one_line(reason)}") from None
    if len(body) > MAX_ANSWER:
        raise Unreachable(f"{shown}/api/workers answered more than {MAX_ANSWER} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise Unreachable(f"{shown}/api/workers did not answer JSON") from None


def _refusal(error: urllib.error.HTTPError, shown: str) -> str:
    status = error.code
    if status in (401, 403):
        try:
            message = str(json.loads(error.read(64 * 1024))["message"])
        except (ValueError, KeyError, TypeError, OSError):
            message = "refused"
        hint = (
            f"; give a client token with --api-token-file or {ENV_TOKENS}" if status == 401 else ""
        )
        return f"the controller at {shown} answered HTTP {status}: {_one_line(message)}{hint}"
    if status == 404:
        return (
            f"{shown} has no /api/workers (HTTP 404): is it an fc-controller? "
            "FastChat's own controller has no status API"
        )
    return f"the controller at {shown} answered HTTP {status} to /api/workers"


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())[:300]


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(1)
