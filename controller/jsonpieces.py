"""A large JSON document checked by msgspec a piece at a time, each piece a few
milliseconds of work, with the same verdict, errors and fields as one call over the whole.

The document is cut about every :data:`PIECE` bytes: at a comma outside strings, or inside
a string too long to look past. Each piece is checked as a JSON document of its own: the
text between two cuts, wrapped so that a parser reads it in the state the whole document is
in there. Before it go the brackets open at its start, each object's with a stand-in key
(``{"_":``), the innermost with a stand-in member and the comma (``[0,`` or ``{"_":0,``),
or the start of the string it is in (``["``, ``{"_":"``, ``{"``); after it go that comma
again, a stand-in member and the closing brackets of those open at its end (``,0]}``), or
the string's end (and a key's value, ``":0}``). The wrapping is valid, so a document is
valid exactly when every piece is (a comma only follows a value; the closing brackets only
fit the brackets really open; a string only ends where it was open), and the first error of
a document is met in the piece that holds it, at the same place (its offset turned back
into the document's). msgspec reads up to 12 bytes past a token's start before it says what
is wrong with it, so a piece refused within 16 bytes of its end is checked again running on
to the next cut, and the message is the one the whole gives.

Where the cuts are and which brackets are open there is worked out without building
anything: each step reduces a slice of the text to its brackets outside strings (as
:mod:`controller.nesting` does), and from where a piece is long enough the text is read
token by token to a place to cut: a comma, or a few bytes into a string, never inside an
escape, between the two escapes of a surrogate pair, or inside a character of several
bytes. That reading is exact for any text that is a valid beginning of a JSON document;
where the text is not, a piece fails before the reading goes wrong.

The fields of an object are read from the piece that holds them whole; a field asked for
whose value a cut falls in is read again from a piece that runs on to the next comma of the
top level. A piece grows past :data:`PIECE` only where no cut is near: around a field asked
for that is that large, a key of the top level that long, or a long run of spaces or a long
number, each then checked in one call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator
from typing import Any

import attrs
import msgspec

from .errors import BadRequestError
from .jsontokens import OFFSET, Marks

__all__ = ["LOOK", "NOT_JSON", "PIECE", "REDUCE", "UTF8", "Check", "Raws", "check", "raws", "utf8"]

#: bytes of text a piece holds before it is cut at the next comma (a few milliseconds)
PIECE = 1 << 20
#: bytes of text reduced to their brackets in one step
REDUCE = 256 << 10
#: how far past a piece's end the next comma is looked for before the piece grows
LOOK = 64 << 10
#: tokens read one at a time while looking for it
_TOKENS = 4096
#: bytes of a large body checked as UTF-8 in one step
UTF8 = 4 << 20

#: how a refusal of a body that is not JSON begins
NOT_JSON = "request body is not valid JSON: "
#: checks one piece as ``_check`` in :mod:`controller.jsonbody` does: the piece, and where
#: its offsets are in the document (the wrapping's length, the piece's first byte there)
Check = Callable[
    [msgspec.json.Decoder[Any], bytes, tuple[int, int]],
    Generator[None, None, tuple[Any, Marks | None]],
]
#: a field's text as a piece had it, and the marks it was checked with
Raws = dict[str, tuple[bytes, Marks | None]]

_OPEN_ARRAY, _OPEN_OBJECT, _COMMA, _QUOTE = 0x5B, 0x7B, 0x2C, 0x22
_CLOSERS = bytes.maketrans(b"[{", b"]}")
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{},:')
_RUNS = re.compile(rb"[\[{]+|[\]}]+")
_STRUCTURE = re.compile(rb'["\[\]{},:]')
# The rest of a string, from a point not inside an escape, and its closing quote.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_BACKSLASHES = re.compile(rb"\\*")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")

#: where a cut is: at a comma, in a string that is a value, in one that is a key
_AT_COMMA, _IN_VALUE, _IN_KEY = 0, 1, 2


@attrs.frozen
class _Cut:
    #: where the comma is, or the first byte of the string after the cut
    at: int
    #: the brackets open there, outermost first
    stack: bytes
    #: _AT_COMMA, _IN_VALUE or _IN_KEY
    kind: int = _AT_COMMA
    #: the last of ``[]{},:`` before it, outside strings
    last: int = _COMMA

    @property
    def member(self) -> bool:
        """Whether the cut is in a member of the top level (not between two)."""
        return len(self.stack) > 1 or self.kind != _AT_COMMA


_START = _Cut(0, b"")


def check(
    text: bytes, decoder: msgspec.json.Decoder[Any], names: tuple[str, ...], check_piece: Check
) -> Generator[None, None, tuple[Raws, bool]]:
    """Checks the document ``text`` (an object or an array) a piece at a time with
    ``check_piece``; the fields ``names`` (of ``decoder``'s type) as their text, and whether any
    piece held tokens only Python's json takes. Yields between steps."""
    found: Raws = {}
    marked = False
    start, before = 0, _START
    whole = False  # a field asked for runs past the last cut: wait for the top level
    for cut in _cuts(text):
        if cut is None:
            yield
            continue
        if whole and cut.member:
            continue
        opening, closing = _opening(before), _closing(cut)
        piece = opening + text[start : cut.at] + closing
        try:
            doc, marks = yield from check_piece(decoder, piece, (len(opening), start))
        except BadRequestError as e:
            if _near(e.problem, cut.at):
                continue  # what msgspec says may hang on the text after the cut: with it
            raise
        held = raws(doc, names, marks)
        whole = cut.member and _cut_into(held, text, cut.at, closing[:-1])
        if whole:
            continue  # checked again, to the next comma of the top level
        found.update(held)
        marked |= marks is not None
        start, before = cut.at + (cut.kind == _AT_COMMA), cut
        yield
    opening = _opening(before)
    doc, marks = yield from check_piece(decoder, opening + text[start:], (len(opening), start))
    found.update(raws(doc, names, marks))
    return found, marked or marks is not None


def utf8(raw: bytes) -> Generator[None, None, None]:
    """Raises what ``raw.decode("utf-8", "surrogatepass")`` raises, if anything, checking
    :data:`UTF8` bytes at a time. Slices end before a byte that starts a character, and
    where one ends in the middle of one, the bytes after it say what is wrong."""
    start, size = 0, len(raw)
    while start < size:
        end = min(start + UTF8, size)
        for _ in range(3):
            if end < size and 0x80 <= raw[end] < 0xC0:
                end += 1
        piece = raw[start:end]
        if not piece.isascii():
            try:
                piece.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as e:
                error = e
                if e.reason == "unexpected end of data" and end < size:
                    try:
                        raw[start : end + 3].decode("utf-8", "surrogatepass")
                    except UnicodeDecodeError as again:
                        error = again
                where = (start + error.start, start + error.end)
                raise UnicodeDecodeError(error.encoding, raw, *where, error.reason) from None
        start = end
        yield


def _near(problem: str, at: int) -> bool:
    """Whether a piece refused with ``problem`` was refused for something at most 16 bytes
    before its cut at ``at`` or past it: msgspec reads up to 12 bytes past a token's start
    before it names what is wrong (a literal, an escape, a surrogate pair), and says
    "truncated" where the piece had fewer."""
    if not problem.startswith(NOT_JSON):
        return False  # too deep, or a byte not UTF-8: nothing after the cut changes it
    offset = OFFSET.search(problem)
    return offset is None or int(offset[1]) >= at - 16


def raws(doc: Any, names: tuple[str, ...], marks: Marks | None) -> Raws:
    """The fields ``names`` of a decoded ``doc``, as their text and the marks they hold."""
    found: Raws = {}
    for name in names:
        raw = getattr(doc, name)
        if raw is not msgspec.UNSET:
            found[name] = (bytes(raw), marks)
    return found


def _cut_into(raws: Raws, text: bytes, at: int, tail: bytes) -> bool:
    """Whether a cut at ``at`` may fall in the value of one of the fields ``raws`` read
    from the piece before it: the last member of that piece, closed by ``tail``, is then
    one of them. (A field whose text merely looks so makes the piece run on; no harm.)"""
    for raw, marks in raws.values():
        if raw.endswith(tail) and len(raw) > len(tail):
            head = raw[: -len(tail)]
            if marks is not None:
                head = marks.restore(head)
            if text.endswith(head, 0, at):
                return True
    return False


def _opening(cut: _Cut) -> bytes:
    """What brings a parser to the state the document is in just after ``cut``."""
    stack = cut.stack
    if not stack:
        return b""
    parts = [b'{"_":' if c == _OPEN_OBJECT else b"[" for c in stack[:-1]]
    inner = stack[-1] == _OPEN_OBJECT
    if cut.kind == _AT_COMMA:
        parts.append(b'{"_":0,' if inner else b"[0,")
    elif cut.kind == _IN_VALUE:
        parts.append(b'{"_":"' if inner else b'["')
    else:
        parts.append(b'{"')
    return b"".join(parts)


def _closing(cut: _Cut) -> bytes:
    """What ends the document from just before ``cut``: at a comma, that comma, a member
    after it and the closing brackets; in a string, its end (a key's value) and those."""
    stack = cut.stack
    closers = stack[::-1].translate(_CLOSERS)
    if cut.kind == _IN_VALUE:
        return b'"' + closers
    if cut.kind == _IN_KEY:
        return b'":0' + closers
    return (b',"_":0' if stack[-1] == _OPEN_OBJECT else b",0") + closers


def _cuts(text: bytes) -> Iterator[_Cut | None]:
    """Commas outside strings, about :data:`PIECE` bytes apart, with the brackets open at
    each (``None`` between steps)."""
    size = len(text)
    stack = bytearray()
    inside, last = False, _COMMA
    pos, target = 0, PIECE
    while target < size:
        while pos < target:
            end = _end(text, min(pos + REDUCE, target))
            inside, last = _reduce(text[pos:end], stack, inside, last)
            pos = end
            yield None
        cut = _cut(text, pos, stack, inside, last)
        if cut is None:
            target = pos + REDUCE  # no place to cut near: the piece grows
            continue
        yield cut
        stack[:] = cut.stack
        inside, last = cut.kind != _AT_COMMA, cut.last
        pos = cut.at + (cut.kind == _AT_COMMA)
        target = pos + PIECE


def _end(text: bytes, end: int) -> int:
    """``end``, or past the run of backslashes it falls in or after and the byte that ends
    it, so that a slice's escapes are its own."""
    if end < len(text) and text[end - 1] == 0x5C:
        end = _BACKSLASHES.match(text, end).end() + 1  # type: ignore[union-attr]
    return min(end, len(text))


def _reduce(piece: bytes, stack: bytearray, inside: bool, last: int) -> tuple[bool, int]:
    """Applies the brackets of ``piece`` outside strings to ``stack``; whether the piece
    ends inside a string (``inside``: whether it starts in one), and the last of
    ``[]{},:`` outside strings (``last``: the one before it)."""
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
        return True, last
    if kept:
        last = kept[-1]
        _apply(kept.translate(None, b",:"), stack)
    return inside, last


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


def _cut(text: bytes, pos: int, stack: bytearray, inside: bool, last: int) -> _Cut | None:
    """The first place from ``pos`` (``inside`` a string or not, ``stack`` open there,
    ``last`` the last of ``[]{},:`` before it) within :data:`LOOK` bytes where the text
    can be cut: a comma outside strings, or a string that runs on past that; ``None`` if
    there is none."""
    limit = min(len(text), pos + LOOK)
    keep = len(stack)
    pushed = bytearray()
    for _ in range(_TOKENS):
        if inside:
            end = _STRING_REST.match(text, pos, limit)
            if end is None:
                return _in_string(text, pos, bytes(stack[:keep]) + pushed, last)
            pos, inside = end.end(), False
            continue
        found = _STRUCTURE.search(text, pos, limit)
        if found is None:
            return None
        at = found.start()
        c = text[at]
        pos = at + 1
        if c == _COMMA:
            return _Cut(at, bytes(stack[:keep]) + pushed) if keep or pushed else None
        if c == _QUOTE:
            inside = True
            continue
        last = c
        if c in (_OPEN_ARRAY, _OPEN_OBJECT):
            pushed.append(c)
        elif c == 0x3A:  # ":"
            pass
        elif pushed:
            pushed.pop()
        elif keep:
            keep -= 1
        else:
            return None
    return None


def _in_string(text: bytes, pos: int, stack: bytes, last: int) -> _Cut | None:
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
    return _Cut(at, stack, _IN_KEY if key else _IN_VALUE, last)
