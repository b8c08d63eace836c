"""The value types of the command line's flags: seconds, ports, whole numbers, sizes."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .worker.ports import port

__all__ = ["port", "seconds", "seconds_or_zero", "size", "whole_number"]


#: units a duration may carry, longest first so that "ms" is not taken for "s"
_TIME_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def _duration(text: str) -> float:
    number, factor = text.strip().lower(), 1.0
    for unit, scale in _TIME_UNITS:
        if number.endswith(unit):
            number, factor = number.removesuffix(unit).strip(), scale
            break
    try:
        return float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds (or with a unit: 500ms, 30s, 5m, 1h), got {text!r}"
        ) from None


def seconds(text: str) -> float:
    """A positive, finite duration: seconds, or a number with ``ms``, ``s``, ``m``, ``h``."""
    value = _duration(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def seconds_or_zero(text: str) -> float:
    """As :func:`seconds`, or 0."""
    return 0.0 if _duration(text) == 0 else seconds(text)


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
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


def size(text: str) -> int:
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
