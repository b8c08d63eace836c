"""Request bodies read as JSON within bounds: only the fields the controller uses.

A body the limits admit may be 64 MiB of anything. The controller needs a few fields of
it, so msgspec checks the whole document at memory speed while decoding only those fields
(each as its raw text), skipping the rest without building it; :mod:`controller.nesting`
refuses documents nested deeper than :data:`MAX_DEPTH` levels the same way. The fields are
then decoded one by one with Python's ``json``, so their values, and the errors they draw,
are what a whole-body ``json.loads`` gave. The body itself is forwarded as it came.

Python's ``json`` takes ``NaN``, ``Infinity``, ``-Infinity`` and lone surrogate escapes
(``"\\ud800"``); msgspec refuses them, and FastChat clients may send them. A body that
holds one is checked again with each such token replaced by a placeholder that is valid
JSON where the token was and inert inside strings, and marked with a number the body does
not contain, so the fields are turned back into their original text before decoding.
Either way the whole document is read by msgspec, never by Python's ``json``.

A large body is read in steps with pauses between them (:meth:`BodyReader.read_async`),
so other requests are served while it is checked: msgspec checks it a piece of about 128 KiB
at a time (:mod:`controller.jsonpieces`), each piece with its own marks if it needs them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, NoReturn, TypeVar

import attrs
import msgspec

from . import jsonpieces
from .errors import BadRequestError
from .jsontokens import OFFSET, Marks, maybe_token
from .nesting import within
from .pacing import bulk_step

__all__ = [
    "INLINE",
    "MAX_DEPTH",
    "BodyReader",
    "Counts",
    "Fields",
    "read",
    "read_as",
    "read_async",
]

#: the deepest nesting a body may have: an object holding an array is two levels
MAX_DEPTH = 64
#: bodies up to this size are read in one go; larger ones pause between steps
INLINE = 256 * 1024
#: a body up to this size with scalar fields may be decoded in one msgspec call (see
#: :func:`_small`)
SMALL = 16 * 1024
_MISS: Any = object()


class _NotJSONNumber(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _NotJSONNumber(f"{name} is not a JSON number")


# For the fields: json.loads would build a new decoder per call when given parse_constant
# (which keeps NaN and Infinity, not JSON numbers, out of the values the controller uses).
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_raw_document = msgspec.json.Decoder(msgspec.Raw)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


@attrs.frozen
class Fields:
    """Which fields of a JSON object are decoded: ``values`` as JSON values (a container
    there is only told apart from a scalar), ``objects`` by their own :class:`Fields`,
    ``lists`` as lists of values (at most ``max_items`` of them decoded). Other fields
    are checked, not decoded."""

    values: tuple[str, ...] = ()
    objects: Mapping[str, Fields] = attrs.field(factory=dict)
    lists: tuple[str, ...] = ()
    #: checks a whole object, decoding these fields as raw text
    decoder: msgspec.json.Decoder[Any] = attrs.field(init=False, eq=False, repr=False)
    #: checks a whole object, decoding these fields as values (see :func:`_small`)
    scalars: msgspec.json.Decoder[Any] = attrs.field(init=False, eq=False, repr=False)
    #: every field named, in order
    names: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        names = (*self.values, *self.objects, *self.lists)
        shape = msgspec.defstruct(
            "Body", [(n, msgspec.Raw | msgspec.UnsetType, msgspec.UNSET) for n in names]
        )
        values = msgspec.defstruct("Values", [(n, Any, msgspec.UNSET) for n in names])
        object.__setattr__(self, "decoder", msgspec.json.Decoder(shape))
        object.__setattr__(self, "scalars", msgspec.json.Decoder(values))
        object.__setattr__(self, "names", names)


@attrs.define
class Counts:
    """What a :class:`BodyReader` did, for tests and the curious."""

    #: bodies msgspec checked as they came
    plain: int = 0
    #: bodies checked with NaN, Infinity and surrogate escapes replaced by placeholders
    marked: int = 0
    #: times a large body's reading let other work run
    pauses: int = 0


@attrs.define
class BodyReader:
    """Reads request bodies with :func:`read`, pausing between the steps of a large one,
    and counts what it did."""

    #: what a pause awaits (the loop's next turn, and the turn of this step in the lane
    #: all large work shares)
    pause: Callable[[], Awaitable[None]] = bulk_step
    counts: Counts = attrs.Factory(Counts)

    def read(self, raw: bytes | bytearray, fields: Fields, max_items: int = 1024) -> Any:
        """:func:`read`, counted, in one go."""
        return _read(raw, fields, max_items, self.counts)

    async def read_async(
        self, raw: bytes | bytearray, fields: Fields, max_items: int = 1024
    ) -> Any:
        """:func:`read`, counted, pausing between its steps when ``raw`` is large."""
        return await _read_async(raw, fields, max_items, self.pause, self.counts)


def read(raw: bytes | bytearray, fields: Fields, max_items: int = 1024) -> Any:
    """The request body ``raw`` as the parse functions of :mod:`controller.protocol` take
    it: for an object, a dict of the ``fields`` it has, decoded as ``json.loads`` would
    (a container where a single value belongs only as an empty or one-element stand-in:
    its kind is all a refusal names; a list past ``max_items`` likewise); anything else
    as ``json.loads`` would, an array as a stand-in; ``None`` for an empty body. Raises
    :class:`BadRequestError` for a body that is not JSON or nests deeper than
    :data:`MAX_DEPTH` levels."""
    return _read(raw, fields, max_items, None)


async def read_async(raw: bytes | bytearray, fields: Fields, max_items: int = 1024) -> Any:
    """:func:`read`, pausing between its steps when ``raw`` is large."""
    return await _read_async(raw, fields, max_items, bulk_step, None)


def _read(raw: bytes | bytearray, fields: Fields, max_items: int, counts: Counts | None) -> Any:
    found = _small(raw, fields)
    if found is not _MISS:
        return found
    return _finish(_steps(raw, fields, max_items, counts))


async def _read_async(
    raw: bytes | bytearray,
    fields: Fields,
    max_items: int,
    pause: Callable[[], Awaitable[None]],
    counts: Counts | None,
) -> Any:
    found = _small(raw, fields)
    if found is not _MISS:
        return found
    return await _drive(_steps(raw, fields, max_items, counts), len(raw) > INLINE, pause, counts)


async def _drive(
    steps: Generator[None, None, Any],
    large: bool,
    pause: Callable[[], Awaitable[None]],
    counts: Counts | None,
) -> Any:
    if not large:
        return _finish(steps)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        if counts is not None:
            counts.pauses += 1
        await pause()


def _small(raw: bytes | bytearray, fields: Fields) -> Any:
    """The fields of a small body whose fields are scalars, decoded by msgspec in one
    call; ``_MISS`` for any other body (the steps then read it, and name what is wrong).

    Most requests are a few dozen bytes naming a model, where the steps cost several times
    the decoding. A body qualifies when it is at most :data:`SMALL` bytes with no more
    brackets than :data:`MAX_DEPTH` (so it cannot nest deeper), msgspec takes it as it
    came (so it holds none of the tokens only Python's ``json`` takes, whose readings the
    steps keep), and each field asked for is a string, number, boolean or null, which
    msgspec reads as ``json.loads`` does.
    """
    doc = read_as(raw, fields.scalars)
    if doc is None:
        return _MISS
    found = {}
    for name in fields.names:
        value = getattr(doc, name)
        if value is not msgspec.UNSET:
            if type(value) in _CONTAINERS:
                return _MISS
            found[name] = value
    return found


_CONTAINERS = (dict, list)

T = TypeVar("T")


def read_as(raw: bytes | bytearray, decoder: msgspec.json.Decoder[T]) -> T | None:
    """``raw`` decoded by a msgspec ``decoder`` of a type (a ``Struct`` of the fields a
    usual request has, say) in one call; ``None`` unless it is at most :data:`SMALL` bytes
    with no more brackets than :data:`MAX_DEPTH` (so it cannot nest deeper) and msgspec
    takes it, types included, as it came. The caller then reads it with :func:`read`,
    which names what is wrong and keeps Python's ``json``'s readings of what msgspec
    refuses; whatever this accepts, :func:`read` accepts with the same values (it starts
    with this very check, see :func:`_small`)."""
    if len(raw) > SMALL or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        return None
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def _finish(steps: Generator[None, None, Any]) -> Any:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _steps(
    raw: bytes | bytearray, fields: Fields, max_items: int, counts: Counts | None
) -> Generator[None, None, Any]:
    if not raw or raw.isspace():
        # FastChat clients send some requests without a body.
        return None
    text = yield from jsonpieces.utf8(raw, INLINE)
    large = len(text) > INLINE
    first = _first(text)
    if first not in (b"{", b"["):
        # A scalar: decoded, it ends where its text does. The caller refuses it by kind.
        return _value(text, None, None)
    decoder, names = (fields.decoder, fields.names) if first == b"{" else (_raw_document, ())
    if large:
        raws, marked = yield from jsonpieces.check(text, decoder, names, _check)
    else:
        doc, marks = yield from _check(decoder, text)
        raws, marked = jsonpieces.raws(doc, names, marks), marks is not None
    if counts is not None:
        counts.plain += not marked
        counts.marked += marked
    if large:
        yield
    if not (yield from within(text, MAX_DEPTH)):
        raise _too_deep()
    # An array stands in for itself: its kind is all a refusal names.
    return _fields(raws, fields, "", max_items) if first == b"{" else []


def _check(
    decoder: msgspec.json.Decoder[Any], text: bytes | bytearray, shift: tuple[int, int] = (0, 0)
) -> Generator[None, None, tuple[Any, Marks | None]]:
    """``text`` decoded by ``decoder``, again with its tokens marked if msgspec refused
    one of them; :class:`BadRequestError` if it is not JSON either way. ``text`` may be a
    piece of a document: offset ``o`` in it is ``o - shift[0] + shift[1]`` there."""
    try:
        return decoder.decode(text), None
    except msgspec.DecodeError as e:
        error = e
    except RecursionError:
        raise _too_deep() from None
    large = len(text) > INLINE or shift != (0, 0)
    if large:
        yield
    marks = (yield from Marks.find(text, large)) if maybe_token(error, text) else None
    if marks is None:
        raise _not_json(error, None, shift)
    if large:
        yield
    return _decode(decoder, marks, shift), marks


def _fields(raws: jsonpieces.Raws, fields: Fields, path: str, max_items: int) -> Any:
    """The ``fields`` of an object from their text ``raws`` (each with the marks it was
    checked with), decoded."""
    found: dict[str, Any] = {}
    for name in fields.values:
        if name in raws:
            marked, marks = raws[name]
            found[name] = _value(marked, marks, path + name)
    for name, inner in fields.objects.items():
        if name not in raws:
            continue
        marked, marks = raws[name]
        if _first(_restored(marked, marks)) == b"{":
            value = _decode(inner.decoder, Marks(marked))
            found[name] = _fields(
                jsonpieces.raws(value, inner.names, marks), inner, f"{path}{name}.", max_items
            )
        else:
            found[name] = _value(marked, marks, path + name)
    for name in fields.lists:
        if name not in raws:
            continue
        marked, marks = raws[name]
        if _first(_restored(marked, marks)) != b"[":
            found[name] = _value(marked, marks, path + name)
            continue
        items = _decode(_raw_list, Marks(marked))
        if len(items) > max_items:
            # Refused by its length before any item is looked at.
            found[name] = [None] * len(items)
        else:
            where = path + name
            found[name] = [_value(bytes(v), marks, f"{where}[{i}]") for i, v in enumerate(items)]
    return found


def _value(marked: bytes | bytearray, marks: Marks | None, path: str | None) -> Any:
    """One JSON value decoded as ``json.loads`` decodes it; a container only by its kind."""
    text = _restored(marked, marks)
    first = _first(text)
    if first in (b"[", b"{"):
        empty = not text.strip()[1:-1].strip()
        if first == b"[":
            return [] if empty else [None]
        return {} if empty else {"": None}
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        pass  # NaN, a lone surrogate, a number past a double: json's rules decide
    try:
        return _decoder.decode(text.decode("utf-8", "surrogatepass"))
    except _NotJSONNumber as e:
        raise BadRequestError(path, str(e)) from None
    except (ValueError, RecursionError) as e:
        raise BadRequestError(None, f"request body is not valid JSON: {e}") from None


def _decode(
    decoder: msgspec.json.Decoder[Any], marks: Marks, shift: tuple[int, int] = (0, 0)
) -> Any:
    try:
        return decoder.decode(marks.text)
    except msgspec.DecodeError as e:
        raise _not_json(e, marks, shift) from None
    except RecursionError:
        raise _too_deep() from None


_SPACE = re.compile(rb"[ \t\n\r]*")


def _first(text: bytes | bytearray) -> bytes | bytearray:
    """The first byte of a JSON text after its leading whitespace."""
    first = text[:1]
    if first not in b" \t\n\r":
        return first
    start = _SPACE.match(text).end()  # type: ignore[union-attr]  # matches even nothing
    return text[start : start + 1]


def _restored(marked: bytes | bytearray, marks: Marks | None) -> bytes | bytearray:
    return marked if marks is None else marks.restore(marked)


def _not_json(
    error: msgspec.DecodeError, marks: Marks | None, shift: tuple[int, int] = (0, 0)
) -> BadRequestError:
    reason = str(error).removeprefix("JSON is malformed: ")
    if marks is not None or shift != (0, 0):
        wrapped, start = shift

        def offset(found: re.Match[str]) -> str:
            at = int(found[1]) if marks is None else marks.offset(int(found[1]))
            return f"(byte {at - wrapped + start})"

        reason = OFFSET.sub(offset, reason)
    reason = reason[:1].lower() + reason[1:]
    return BadRequestError(None, jsonpieces.NOT_JSON + reason)


def _too_deep() -> BadRequestError:
    return BadRequestError(None, f"request body is nested too deeply: more than {MAX_DEPTH} levels")
