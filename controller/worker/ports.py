"""The port number both commands (``fc-controller``, ``fc-demo-worker``) take: 0 to
65535, 0 asking the system for a free one. Here, on the worker side, so both can use it."""

from __future__ import annotations

import argparse

__all__ = ["port"]


def port(text: str) -> int:
    """An argparse type: a port from 0 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value
