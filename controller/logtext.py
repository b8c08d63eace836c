"""What a log line may say of text that came from the network: escaped and short."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["brief", "brief_names"]

#: characters of one value shown in a log line
MAX_SHOWN = 200
#: names of a list shown in a log line
MAX_NAMES_SHOWN = 8


def brief(value: str, limit: int = MAX_SHOWN) -> str:
    """``value`` escaped as a Python literal (no line breaks, no control or bidi
    characters reach the log) and cut to about ``limit`` characters, saying how long it
    was."""
    if len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def brief_names(names: Sequence[str]) -> str:
    """The first few of ``names``, each :func:`brief`, and how many more there are."""
    shown = ", ".join(brief(n, 64) for n in names[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return f"[{shown}, ... and {more} more]" if more > 0 else f"[{shown}]"
