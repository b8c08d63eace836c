"""Where a JSON document can be cut into pieces that msgspec checks one at a time (see
:mod:`controller.jsonpieces`), and what wraps each piece.

A cut is about every :data:`PIECE` bytes: at a comma outside strings, or inside a string or
a run of spaces too long to look past. The text between two cuts is checked as a document
of its own, wrapped so that a parser reads it in the state the whole document is in there
(:func:`opening`, :func:`closing`). Before it go the brackets open at its start, each
object's with a stand-in key (``{"_":``), the innermost with a stand-in member and the
comma (``[0,`` or ``{"_":0,``), or the start of the string it is in (``["``, ``{"_":"``,
``{"``), or what came before the spaces (an opening bracket, a member, a key, a colon);
after it go that comma again, a stand-in member and the closing brackets of those open at
its end (``,0]}``), or the string's end (and a key's value, ``":0}``), or what is due after
the spaces (a value, a member, a colon and a value). The wrapping is valid, so a document
is valid exactly when every piece is: a comma only follows a value, the closing brackets
only fit the brackets really open, a string only ends where one was open.

Where the cuts are and which brackets are open there is worked out without building
anything: each step reduces a slice of the text to its brackets outside strings (as
:mod:`controller.nesting` does), and from where a piece is long enough the text is read
token by token to a place to cut: a comma, a few bytes into a string (never inside an
escape, between the two escapes of a surrogate pair, or inside a character of several
bytes), or into a run of 16 spaces or more. That reading is exact for any text that is a
valid beginning of a JSON document; where the text is not, a piece fails before the
reading goes wrong. There is no cut inside a number, nor in a key of the top level or
between one and its value (cut there, a piece could read a stand-in as a field's value).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

__all__ = ["LOOK", "PIECE", "REDUCE", "START", "Cut", "closing", "cuts", "opening"]

#: bytes of text a piece holds before it is cut at the next place it can be
PIECE = 128 << 10
#: bytes of text reduced to their brackets in one step
REDUCE = 32 << 10
#: how far past a piece's end a place to cut is looked for before the piece grows
LOOK = 64 << 10
#: tokens read one at a time while looking for it
_TOKENS = 4096

_OPEN_ARRAY, _OPEN_OBJECT, _COMMA, _QUOTE = 0x5B, 0x7B, 0x2C, 0x22
_CLOSERS = bytes.maketrans(b"[{", b"]}")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{},:')
_RUNS = re.compile(rb"[\[{]+|[\]}]+")
_STRUCTURE = re.compile(rb'["\[\]{},:]')
# The rest of a string, from a point not inside an escape, and its closing quote.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_BACKSLASHES = re.compile(rb"\\*")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")

#: where a cut is: at a comma, in a string (a value or a key), or in a run of spaces
#: after an opening bracket, before a value, before a key, before a colon, after a value
_AT_COMMA, _IN_VALUE, _IN_KEY = 0, 1, 2
_OPENED, _TO_VALUE, _TO_KEY, _TO_COLON, _VALUED = 3, 4, 5, 6, 7
#: each kind's wrapping of the innermost level, in an array and in an object: what opens it
#: to the state after the cut, and what ends it from the state before (its bracket after)
_WRAPS = {
    _AT_COMMA: ((b"[0,", b",0"), (b'{"_":0,', b',"_":0')),
    _IN_VALUE: ((b'["', b'"'), (b'{"_":"', b'"')),
    _IN_KEY: ((b"", b""), (b'{"', b'":0')),
    _OPENED: ((b"[", b""), (b"{", b"")),
    _TO_VALUE: ((b"[0,", b"0"), (b'{"_":', b"0")),
    _TO_KEY: ((b"", b""), (b'{"_":0,', b'"_":0')),
    _TO_COLON: ((b"", b""), (b'{"_"', b":0")),
    _VALUED: ((b"[0", b""), (b'{"_":0', b"")),
}
#: the kinds of cut that fall between two members of an object
_BETWEEN = (_AT_COMMA, _OPENED, _TO_KEY, _VALUED)
_SPACE = b" \t\n\r"
_SPACES = re.compile(rb"[ \t\n\r]{16,}")


@attrs.frozen
class Cut:
    """A place where a document is cut, and the state a parser is in there."""

    #: where the comma is, or (in a string or spaces) the first byte after the cut
    at: int
    #: the brackets open there, outermost first
    stack: bytes
    #: which of the places above it is (_AT_COMMA ... _VALUED)
    kind: int = _AT_COMMA
    #: the last of ``[]{},:`` before it, outside strings
    last: int = _COMMA
    #: the last byte but spaces before it
    sig: int = _COMMA

    @property
    def member(self) -> bool:
        """Whether the cut is in a member of the top level (not between two)."""
        return len(self.stack) > 1 or self.kind not in _BETWEEN

    @property
    def resume(self) -> int:
        """Where the text of the piece after the cut starts (a comma is read by both)."""
        return self.at + (self.kind == _AT_COMMA)


#: the start of a document
START = Cut(0, b"")


def opening(cut: Cut) -> bytes:
    """What brings a parser to the state the document is in just after ``cut``."""
    stack = cut.stack
    if not stack:
        return b""
    # Each "{" but the last opens a member "_" (a deep nest makes this long: C speed).
    return (
        bytes(stack[:-1]).replace(b"{", b'{"_":') + _WRAPS[cut.kind][stack[-1] == _OPEN_OBJECT][0]
    )


def closing(cut: Cut) -> bytes:
    """What ends the document from just before ``cut``: at a comma, that comma, a member
    after it and the closing brackets; in a string, its end (a key's value) and those;
    in spaces, a value, key or colon if one is due, and those."""
    stack = cut.stack
    return _WRAPS[cut.kind][stack[-1] == _OPEN_OBJECT][1] + stack[::-1].translate(_CLOSERS)


def cuts(text: bytes | bytearray) -> Iterator[Cut | None]:
    """Commas outside strings, about :data:`PIECE` bytes apart, with the brackets open at
    each (``None`` between steps)."""
    size = len(text)
    stack = bytearray()
    inside, last, sig = False, _COMMA, _COMMA
    pos, target = 0, PIECE
    while target < size:
        while pos < target:
            end = _end(text, min(pos + REDUCE, target))
            inside, last, sig = _reduce(text[pos:end], stack, inside, last, sig)
            pos = end
            yield None
        cut = _cut(text, pos, stack, inside, (last, sig))
        if cut is None:
            target = pos + REDUCE  # no place to cut near: the piece grows
            continue
        yield cut
        stack[:] = cut.stack
        inside, last = cut.kind in (_IN_VALUE, _IN_KEY), cut.last
        sig = cut.sig
        pos = cut.at + (cut.kind == _AT_COMMA)
        target = pos + PIECE


def _end(text: bytes | bytearray, end: int) -> int:
    """``end``, or past the run of backslashes it falls in or after and the byte that ends
    it, so that a slice's escapes are its own."""
    if end < len(text) and text[end - 1] == 0x5C:
        end = _BACKSLASHES.match(text, end).end() + 1  # type: ignore[union-attr]
    return min(end, len(text))


def _reduce(
    piece: bytes | bytearray, stack: bytearray, inside: bool, last: int, sig: int
) -> tuple[bool, int, int]:
    """Applies the brackets of ``piece`` outside strings to ``stack``; whether the piece
    ends inside a string (``inside``: whether it starts in one), the last of ``[]{},:``
    outside strings and the last byte but spaces (``last``, ``sig``: those before it)."""
    tail = piece.rstrip(_SPACE)
    if tail:
        sig = tail[-1]
    if b"\\" in piece:
        # An escaped backslash goes first, then an escaped quote: every quote left
        # delimits a string.
        piece = piece.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = piece.translate(None, _NOT_STRUCTURE)
    if b'"' in kept:
        # Two quotes side by side enclose nothing or leave nothing outside: they go.
        parts = kept.replace(b'""', b"").split(b'"')
        kept = b"".join(parts[1 if inside else 0 :: 2])
        inside ^= len(parts) % 2 == 0
    elif inside:
        return True, last, sig
    if kept:
        last = kept[-1]
        _apply(bytes(kept.translate(None, b",:")), stack)
    return inside, last, sig


def _apply(brackets: bytes, stack: bytearray) -> None:
    # Pairs that close at once go while that thins the brackets; what is left is read by
    # runs (a deep nest is a few runs, a bushy one is gone).
    while len(brackets) > 256:
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) * 8 > len(brackets) * 7:
            brackets = shorter
            break
        brackets = shorter
    for run in _RUNS.findall(brackets):
        if run[0] in b"[{":
            stack += run
        else:
            del stack[max(0, len(stack) - len(run)) :]  # past the bottom: not JSON, no matter


def _cut(
    text: bytes | bytearray, pos: int, stack: bytearray, inside: bool, before: tuple[int, int]
) -> Cut | None:
    """The first place from ``pos`` (``inside`` a string or not, ``stack`` open there,
    ``before`` the last of ``[]{},:`` before it and the last byte but spaces) within
    :data:`LOOK` bytes where the text can be cut: a comma outside strings, a string that
    runs on past that, or a run of spaces; ``None`` if there is none."""
    last, sig = before
    limit = min(len(text), pos + LOOK)
    keep = len(stack)
    pushed = bytearray()
    for _ in range(_TOKENS):
        if inside:
            end = _STRING_REST.match(text, pos, limit)
            if end is None:
                return _in_string(text, pos, bytes(stack[:keep]) + pushed, last)
            pos, inside, sig = end.end(), False, _QUOTE
            continue
        found = _STRUCTURE.search(text, pos, limit)
        if found is None:
            spaces = _SPACES.search(text, pos, min(len(text), limit + 64))
            if spaces is None or _STRUCTURE.search(text, pos, spaces.start()):
                return None
            at = spaces.start()
            sig = text[at - 1] if at > pos else sig
            return _in_spaces(at + 8, bytes(stack[:keep]) + pushed, last, sig)
        at = found.start()
        c = sig = text[at]
        pos = at + 1
        if c == _COMMA:
            return Cut(at, bytes(stack[:keep]) + pushed) if keep or pushed else None
        if c == _QUOTE:
            inside = True
            continue
        last = c
        if c == 0x3A:  # ":"
            continue
        # A run of brackets is one step, however long (a deep nest is one run of each).
        run = _RUNS.match(text, at, limit)
        assert run is not None, "at least the bracket just found"
        brackets = run.group()
        pos = run.end()
        last = sig = brackets[-1]
        if c in (_OPEN_ARRAY, _OPEN_OBJECT):
            pushed += brackets
            continue
        closed = min(len(brackets), len(pushed))
        del pushed[len(pushed) - closed :]
        if len(brackets) - closed > keep:
            return None
        keep -= len(brackets) - closed
    return None


def _in_spaces(at: int, stack: bytes, last: int, sig: int) -> Cut | None:
    """A cut at ``at``, in a run of spaces outside strings (``stack`` open, ``last`` the
    last of ``[]{},:`` before it, ``sig`` the last byte but spaces), its kind told by what
    came before; ``None`` at the top level or in a member of the top level that has its
    key but not yet its value."""
    if not stack:
        return None
    in_object = stack[-1] == _OPEN_OBJECT
    if sig in (_OPEN_ARRAY, _OPEN_OBJECT):
        kind = _OPENED
    elif sig == _COMMA:
        kind = _TO_KEY if in_object else _TO_VALUE
    elif sig == 0x3A:  # ":"
        kind = _TO_VALUE
    elif sig == _QUOTE and in_object and last in (_OPEN_OBJECT, _COMMA):
        kind = _TO_COLON  # a key's string ended
    else:
        kind = _VALUED
    if len(stack) == 1 and kind in (_TO_VALUE, _TO_COLON) and in_object:
        return None
    return Cut(at, stack, kind, last, sig)


def _in_string(text: bytes | bytearray, pos: int, stack: bytes, last: int) -> Cut | None:
    """A cut in the string ``pos`` is in (``stack`` open, ``last`` before it) a few bytes
    on: not inside an escape, nor between the two escapes of a surrogate pair, nor inside
    a character of several bytes. ``None`` for a key of the top level (its text, cut,
    could read as a field's name) or where the string ends first."""
    if not stack:
        return None
    key = stack[-1] == _OPEN_OBJECT and last in (_OPEN_OBJECT, _COMMA)
    if key and len(stack) == 1:
        return None
    at = pos
    for _ in range(8):
        escape = text.find(b"\\", at, at + 6)
        if escape < 0:
            # Six bytes without a backslash: no escape is open past them.
            at += 6
            for _ in range(3):
                if at < len(text) and 0x80 <= text[at] < 0xC0:
                    at += 1
            break
        # ``escape`` starts one: a cut goes before it, unless it may end a surrogate pair.
        if not _HIGH_SURROGATE.fullmatch(text, max(escape - 6, 0), escape):
            at = escape
            break
        at = escape + (6 if text[escape + 1 : escape + 2] == b"u" else 2)
    else:
        return None
    if at >= len(text) or _STRING_REST.match(text, pos, at) is not None:
        return None
    return Cut(at, stack, _IN_KEY if key else _IN_VALUE, last, _QUOTE)
