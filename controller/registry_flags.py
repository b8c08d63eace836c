"""The shared registry's flags: ``--registry`` (``memory`` or a Redis URL) and
``--registry-password-file``; both read ``FC_CONTROLLER_<FLAG>`` like every flag of ours."""

from __future__ import annotations

import argparse
from typing import Any

from .config import MEMORY_REGISTRY, check_registry
from .errors import ConfigError

__all__ = ["add_registry_flags", "registry_settings"]


def _registry(value: str) -> str:
    try:
        check_registry(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_registry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        type=_registry,
        default=MEMORY_REGISTRY,
        metavar="memory|URL",
        help="where the registry lives: 'memory' (this process) or redis://HOST:PORT/DB "
        "(rediss:// for TLS), shared by every replica pointed at it (default: %(default)s)",
    )
    parser.add_argument(
        "--registry-password-file",
        default=None,
        metavar="PATH",
        help="a file holding the Redis password, when it is not in the --registry URL "
        "(default: none)",
    )


def registry_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of the registry flags; exits with status 2 naming a bad one."""
    shared = args.registry != MEMORY_REGISTRY
    if shared and args.state_file is not None:
        parser.error(
            "--state-file cannot be combined with a Redis --registry: a restarted replica "
            "starts from the replicas' shared copy in Redis"
        )
    password: str | None = None
    path = args.registry_password_file
    if path is not None:
        if not shared:
            parser.error("--registry-password-file needs a Redis --registry")
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--registry-password-file: cannot read {path!r}: {e}")
        if not password:
            parser.error(f"--registry-password-file: {path!r} is empty")
    return {"registry": args.registry, "registry_password": password}
