"""What Python's ``json`` takes and msgspec refuses: ``NaN``, ``Infinity``, ``-Infinity``
and escapes of lone surrogates (``"\\ud800"``), marked so msgspec can check the rest.

FastChat clients may send them, and a body that was accepted must stay accepted, so a body
msgspec refuses for one of them is checked again with each replaced by a placeholder
(:class:`Marks`); the fields the controller reads are turned back into their original
text before Python's ``json`` decodes them (see :mod:`controller.jsonbody`).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Generator

import attrs
import msgspec

__all__ = ["OFFSET", "Marks", "maybe_token"]

#: where msgspec's messages say an error is
OFFSET = re.compile(r"\(byte (\d+)\)")


def maybe_token(error: msgspec.DecodeError, text: bytes | bytearray) -> bool:
    """Whether msgspec may have refused ``text`` for a token only Python's json takes (the
    search for them costs five scans of the body)."""
    reason = str(error)
    if "surrogate" in reason or "escape" in reason or "truncated" in reason:
        return True
    at = OFFSET.search(reason)
    return at is None or text[int(at[1]) : int(at[1]) + 1] in (b"N", b"I")


# Python's json takes these; msgspec does not. Longest first: -Infinity holds Infinity.
_TOKENS = (b"-Infinity", b"Infinity", b"NaN")
# The escapes of U+D000 to U+DFFF, lone surrogates among them.
_ESCAPES = (b"\\ud", b"\\uD")
#: each escape where four hex digits follow its "\\u"
_ESCAPE = {e: re.compile(re.escape(e) + rb"(?=[0-9a-fA-F]{3})") for e in _ESCAPES}
#: what Marks.find looks for, each with a shorter text it holds
_SCANS: tuple[tuple[bytes, bytes | None], ...] = (
    (b"NaN", None),
    (b"Infinity", None),
    (b"-Infinity", b"Infinity"),
    (b"\\u", None),
    (b"\\ud", b"\\u"),
    (b"\\uD", b"\\u"),
)


@attrs.frozen
class Marks:
    """A document with what only Python's json takes replaced by placeholders: each token
    by an array holding a number the document does not contain, each surrogate escape's
    start by an escaped "_" and that number (``\\ud800`` becomes ``\\u005f<n>d800``).
    Each is valid JSON where its token was valid and invalid where it was not, and inert
    text inside a string, where it changes nothing of the document's structure."""

    text: bytes | bytearray
    #: (placeholder, what it replaced)
    undo: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def find(cls, text: bytes | bytearray, large: bool) -> Generator[None, None, Marks | None]:
        """``text`` with its tokens marked; ``None`` if it has none. Yields between its
        scans when ``text`` is ``large``."""
        found: set[bytes] = set()
        # Each scan only where the shorter text it holds was found.
        for token, holds in _SCANS:
            if (holds is None or holds in found) and token in text:
                found.add(token)
                if large:
                    yield
        tokens = [t for t in (*_TOKENS, *_ESCAPES) if t in found]
        if not tokens:
            return None
        tag = _tag(text)
        whole: bool | None = None  # whether every escape is whole, once one is marked
        undo: list[tuple[bytes, bytes]] = []
        for token in tokens:
            if large:
                yield
            if token in _TOKENS:
                mark = b"[%s%d]" % (tag, _TOKENS.index(token))
                text = text.replace(token, mark)
            else:
                mark = b"\\u005f" + tag + token[-1:]
                if whole is None:
                    whole = _whole_escapes(text)
                    if large:
                        yield
                # Only a whole escape: "\\ud8" with no hex digits after stays invalid.
                if whole:
                    text = text.replace(token, mark)
                else:
                    text = _ESCAPE[token].sub(mark.replace(b"\\", b"\\\\"), text)
            undo.append((mark, token))
        return cls(text, tuple(undo))

    def restore(self, marked: bytes | bytearray) -> bytes | bytearray:
        """A part of :attr:`text` as the original document had it."""
        for mark, token in self.undo:
            if mark in marked:
                marked = marked.replace(mark, token)
        return marked

    def offset(self, marked: int) -> int:
        """The offset in the original document of offset ``marked`` of :attr:`text`."""
        return marked - sum(
            self.text.count(mark, 0, marked) * (len(mark) - len(token)) for mark, token in self.undo
        )


_HEX_AS_ZERO = bytes.maketrans(b"123456789abcdefABCDEF", b"0" * 21)


def _whole_escapes(text: bytes | bytearray) -> bool:
    """Whether every "\\u" and hex digit in ``text`` is followed by three more (then
    each surrogate escape may be marked by a plain replace, many times faster than the
    pattern that checks each)."""
    zeros = text.translate(_HEX_AS_ZERO)
    return zeros.count(b"\\u0") == zeros.count(b"\\u0000")


def _tag(text: bytes | bytearray) -> bytes:
    """Digits that no "[" or escaped "_" in ``text`` is followed by: then no placeholder
    occurs in ``text``, nor across a placeholder's edge. As short as that allows, so a
    body full of NaN grows little when marked: a longer tag is tried only when two random
    ones of a length are taken, which takes a body ten times larger at each length."""
    for digits in itertools.count(1):
        for _ in range(2):
            low = 10 ** (digits - 1)
            tag = b"%d" % (low + int.from_bytes(os.urandom(8)) % (9 * low))
            if b"[" + tag not in text and b"\\u005f" + tag not in text:
                return tag
    raise AssertionError("unreachable")  # pragma: no cover
