"""A large JSON document checked by msgspec a piece at a time, each piece a few
milliseconds of work, with the same verdict, errors and fields as one call over the whole.

The pieces are cut and wrapped by :mod:`controller.jsoncuts`: a piece is valid exactly
when the whole document reads through it, and the first error of a document is met in the
piece that holds it, at the same place (its offset turned back into the document's).
msgspec reads up to 12 bytes past a token's start before it says what is wrong with it, so
a piece refused within 16 bytes of its end is checked again running on to the next cut,
and the message is the one the whole gives. Each piece holding NaN, Infinity or lone
surrogates is marked on its own (:mod:`controller.jsontokens`).

The fields of an object are read from the piece that holds them whole; a field asked for
whose value a cut falls in is read again from a piece that runs on to the next cut between
two members of the top level. A piece grows past :data:`~controller.jsoncuts.PIECE` only
where no cut is near: around a field asked for that is that large, a key of the top level
that long (or spaces after one), or a long number, each then checked in one call.

A body is read as UTF-8 here too, a large one a slice at a time (:func:`utf8`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from typing import Any

import msgspec

from .errors import BadRequestError
from .jsoncuts import START, closing, cuts, opening
from .jsontokens import OFFSET, Marks

__all__ = ["NOT_JSON", "UTF8", "Check", "Raws", "check", "raws", "utf8"]

#: bytes of a large body checked as UTF-8 in one step
UTF8 = 512 << 10
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


def check(
    text: bytes | bytearray,
    decoder: msgspec.json.Decoder[Any],
    names: tuple[str, ...],
    check_piece: Check,
) -> Generator[None, None, tuple[Raws, bool]]:
    """Checks the document ``text`` (an object or an array) a piece at a time with
    ``check_piece``; the fields ``names`` (of ``decoder``'s type) as their text, and whether any
    piece held tokens only Python's json takes. Yields between steps."""
    found: Raws = {}
    marked = False
    start, before = 0, START
    whole = False  # a field asked for runs past the last cut: wait for the top level
    for cut in cuts(text):
        if cut is None:
            yield
            continue
        if whole and cut.member:
            continue
        head, tail = opening(before), closing(cut)
        piece = head + text[start : cut.at] + tail
        try:
            doc, marks = yield from check_piece(decoder, piece, (len(head), start))
        except BadRequestError as e:
            if _near(e.problem, cut.at):
                continue  # what msgspec says may hang on the text after the cut: with it
            raise
        held = raws(doc, names, marks)
        whole = cut.member and _cut_into(held, text, cut.at, tail[:-1])
        if whole:
            continue  # checked again, to the next comma of the top level
        found.update(held)
        marked |= marks is not None
        start, before = cut.resume, cut
        yield
    head = opening(before)
    doc, marks = yield from check_piece(decoder, head + text[start:], (len(head), start))
    found.update(raws(doc, names, marks))
    return found, marked or marks is not None


def utf8(raw: bytes | bytearray, inline: int) -> Generator[None, None, bytes | bytearray]:
    """``raw`` in UTF-8, read as ``json.loads(bytes)`` reads it: UTF-8 (lone surrogates
    allowed, as Python's ``json`` allows them), with or without a BOM, UTF-16 or UTF-32;
    :class:`BadRequestError` if it is none of them. A body in UTF-8 of more than ``inline``
    bytes is checked :data:`UTF8` bytes at a time, yielding between slices."""
    # A body opening with "{" and no NUL after it is UTF-8 by json.detect_encoding's own
    # rules; nearly every body is one, and the detection costs as much as the rest.
    encoding = "utf-8" if raw[0] == 0x7B and raw[1:2] != b"\0" else json.detect_encoding(raw)
    try:
        if encoding != "utf-8":
            return raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        if len(raw) > inline:
            yield from _utf8_slices(raw)
        elif not raw.isascii():
            raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise BadRequestError(None, f"{NOT_JSON}{e}") from None
    return raw


def _utf8_slices(raw: bytes | bytearray) -> Generator[None, None, None]:
    """Refuses ``raw`` with what ``raw.decode("utf-8", "surrogatepass")`` raises, if
    anything, checking :data:`UTF8` bytes at a time. Slices end before a byte that starts a
    character, and where one ends in the middle of one, the bytes after it say what is
    wrong."""
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
                raise BadRequestError(None, NOT_JSON + _shifted(error, start)) from None
        start = end
        yield


def _shifted(error: UnicodeDecodeError, start: int) -> str:
    """What ``str(error)`` says, its positions ``start`` bytes further on. (An error made
    over the whole body would copy a bytearray body whole, in one step, to bytes.)"""
    at, end = error.start + start, error.end + start
    if error.end == error.start + 1:
        where = f"byte 0x{error.object[error.start]:02x} in position {at}"
    else:
        where = f"bytes in position {at}-{end - 1}"
    return f"'{error.encoding}' codec can't decode {where}: {error.reason}"


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


def _cut_into(raws: Raws, text: bytes | bytearray, at: int, tail: bytes) -> bool:
    """Whether a cut at ``at`` may fall in the value of one of the fields ``raws`` read
    from the piece before it: the last member of that piece, closed by ``tail``, is then
    one of them. (A field whose text merely looks so makes the piece run on; no harm.)"""
    for raw, marks in raws.values():
        if raw.endswith(tail) and len(raw) > len(tail):
            head: bytes | bytearray = raw[: -len(tail)]
            if marks is not None:
                head = marks.restore(head)
            if text.endswith(head, 0, at):
                return True
    return False
