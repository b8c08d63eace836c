"""How deeply a JSON document nests, found without building it.

A request body the limits admit may hold millions of containers; Python's ``json`` builds
every one of them to learn nothing the controller needs. Here the document (already known
to be valid JSON) is reduced with byte-level operations that run in C: escapes that could
hide a quote are dropped, every byte but quotes and brackets is deleted, strings are cut
out, and what is left is a string of opening and closing brackets. Most bodies are settled
by counting: a document with at most ``limit`` opening brackets cannot nest deeper, nor one
whose brackets, once the innermost pairs are set aside, are that few. The rest is measured
exactly, a slice at a time.

The work is a generator that yields between steps, so a caller on the event loop can let
other requests run in between (see :mod:`controller.jsonbody`); driven to the end without
pausing it is an ordinary function.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Generator, Iterator

__all__ = ["SLICE", "TEXT_SLICE", "within"]

#: bytes of brackets measured between two pauses (under a millisecond of work)
SLICE = 32 << 10
#: bytes of a document reduced to its brackets between two pauses (under a millisecond)
TEXT_SLICE = 256 << 10

_OPEN = b"("
_CLOSE = b")"
# Brackets of both kinds become ( and ); quotes stay; everything else goes.
_BRACKETS = bytes.maketrans(b"[]{}", b"()()")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')


@functools.cache
def _bounded(depth: int) -> re.Pattern[bytes]:
    """A pattern for balanced brackets nesting at most ``depth`` levels. Possessive
    repeats: a document is matched in one pass, never backtracked."""
    pattern = b""
    for _ in range(depth):
        pattern = rb"(?:\(" + pattern + rb"\))*+"
    return re.compile(pattern)


_RUNS = re.compile(rb"\(+|\)+")


def within(text: bytes | bytearray, limit: int) -> Generator[None, None, bool]:
    """Whether the valid JSON document ``text`` nests at most ``limit`` levels (an object
    or array at the top is one level). Yields between steps that each take a few
    milliseconds of a 16 MiB document."""
    opens = 0
    for start, end in _cuts(text):
        opens += text.count(b"[", start, end) + text.count(b"{", start, end)
        yield
    if opens <= limit:
        return True
    kept: list[bytes] = []
    for start, end in _cuts(text):
        piece = text[start:end]
        if b"\\" in piece:
            # Outside strings JSON has no backslash; inside, an escaped backslash goes
            # first, then an escaped quote, and every quote left delimits a string.
            piece = piece.replace(b"\\\\", b"").replace(b'\\"', b"")
        # A string without brackets is left as "": dropping every "" also merges strings
        # that had only commas, colons or scalars between them, which keeps their brackets
        # inside. (A pair split between two pieces stays: it is an empty string.)
        kept.append(bytes(piece.translate(_BRACKETS, _NOT_STRUCTURE).replace(b'""', b"")))
        yield
    # The brackets stay in their pieces: joined, they were one step of up to 30 MiB.
    if any(b'"' in piece for piece in kept):
        kept = yield from _outside_strings(kept)
    yield
    return (yield from _balanced_within(kept, limit))


_BACKSLASHES = re.compile(rb"\\*")


def _cuts(text: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """``text`` in slices of about ``TEXT_SLICE`` bytes, as (start, end) pairs, never cut
    inside or right after a run of backslashes, so that each slice's escapes are its own."""
    start, size = 0, len(text)
    while start < size:
        end = start + TEXT_SLICE
        if end < size and text[end - 1] == 0x5C:
            # Past the run and the byte that ends it (which no backslash escapes then).
            end = _BACKSLASHES.match(text, end).end() + 1  # type: ignore[union-attr]
        end = min(end, size)
        yield start, end
        start = end


def _slices(parts: list[bytes]) -> Iterator[bytes]:
    """``parts`` in slices of at most ``SLICE`` bytes, in order."""
    for part in parts:
        for start in range(0, len(part), SLICE):
            yield part[start : start + SLICE]


def _outside_strings(parts: list[bytes]) -> Generator[None, None, list[bytes]]:
    """``parts`` (quotes and brackets only, read one after another) without the strings'
    contents."""
    kept: list[bytes] = []
    inside = False
    for piece in _slices(parts):
        pieces = piece.split(b'"')
        kept.append(b"".join(pieces[1 if inside else 0 :: 2]))
        inside ^= len(pieces) % 2 == 0
        yield
    return kept


def _balanced_within(parts: list[bytes], limit: int) -> Generator[None, None, bool]:
    """Whether the balanced brackets ``parts`` (read one after another) nest at most
    ``limit`` levels."""
    depth = 0
    for piece in _slices(parts):
        opens = piece.count(_OPEN)
        if not _piece_within(piece, opens, depth, limit):
            return False
        depth += opens * 2 - len(piece)
        yield
    return True


def _piece_within(piece: bytes, opens: int, depth: int, limit: int) -> bool:
    """Whether a slice of balanced brackets with ``opens`` opening ones, entered at
    ``depth``, stays within ``limit``."""
    innermost = piece.count(b"()")
    if _shallow(piece, opens, innermost, depth, limit):
        return True
    if innermost * 32 <= len(piece):
        # Long runs (deep, narrow nesting): walk the runs, a few per hundred brackets.
        runs = [len(run) for run in _RUNS.findall(piece)]
        if piece.startswith(_CLOSE):
            runs.insert(0, 0)
        runs[1::2] = [-n for n in runs[1::2]]
        return max(itertools.accumulate(runs, initial=depth)) <= limit
    # Short runs: one pass of a pattern that admits only what nests within the limit,
    # over the slice as it would read from the top of the document.
    end = depth + opens * 2 - len(piece)  # the depth after the slice
    return _bounded(limit).fullmatch(_OPEN * depth + piece + _CLOSE * end) is not None


def _shallow(piece: bytes, opens: int, innermost: int, depth: int, limit: int) -> bool:
    """Whether counting proves the slice within ``limit``. Taking out every innermost
    pair "()" lowers its deepest point by one, and a slice nests at most one level deeper
    than it has opening brackets left once its innermost pairs are out: bushy shapes are
    settled in a pass or two."""
    for level in range(4):
        if depth + level + opens <= limit:
            return True
        if innermost and depth + level + 1 + opens - innermost <= limit:
            return True
        if innermost * 4 < len(piece):
            return False  # a pass would take out little
        piece = piece.replace(b"()", b"")
        opens, innermost = piece.count(_OPEN), piece.count(b"()")
    return False
