"""A large body checked a piece at a time (controller.jsonpieces, cut by controller.jsoncuts)
gives what one check of the whole gives: the same acceptance (Python's json's, within 64
levels), the same fields, the same error message, for every place a document can be cut."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from controller import jsonbody, jsoncuts, jsonpieces, protocol
from controller.errors import BadRequestError
from controller.jsonbody import Fields

from .test_json_bounds import reference_depth

#: a request's fields, and a registration's (an object field and a list field)
FIELD_SETS = [protocol.DISPATCH, protocol.REGISTER]


def outcome(
    raw: bytes | bytearray, fields: Fields, *, pieces: bool, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """What reading ``raw`` gives: ("ok", fields) or ("refused", message). Every body is
    read as a large one (in pieces) or as a small one (in one check)."""
    with monkeypatch.context() as m:
        m.setattr(jsonbody, "SMALL", 0)
        m.setattr(jsonbody, "INLINE", 0 if pieces else 1 << 40)
        try:
            return ("ok", jsonbody.read(raw, fields))
        except BadRequestError as e:
            return ("refused", str(e))


def _string(rng: random.Random) -> str:
    return "".join(
        rng.choice(['"', "\\", ",", "[", "]", "{", "}", ":", "a", " ", "\ud800", "é", "😀", "NaN"])
        for _ in range(rng.randrange(12))
    )


def _value(rng: random.Random, level: int) -> Any:
    kind = rng.randrange(7 if level < 8 else 3)
    if kind == 0:
        return _string(rng)
    if kind == 1:
        return rng.choice([0, -1.5e300, 12345678901234567890, True, None, math.nan, -math.inf])
    if kind == 2:
        return rng.choice([[], {}, "", 0])
    if kind in (3, 4):
        return [_value(rng, level + 1) for _ in range(rng.randrange(5))]
    return {
        rng.choice(["model", "a,", "_", "x", '"[']): _value(rng, level + 1)
        for _ in range(rng.randrange(4))
    }


def _document(rng: random.Random) -> bytes:
    doc: dict[str, Any] = {"model": _value(rng, 1), "junk": [_value(rng, 1) for _ in range(3)]}
    if rng.random() < 0.5:
        doc["worker_status"] = {"model_names": [_value(rng, 2) for _ in range(3)], "speed": 1}
    if rng.random() < 0.3:
        doc["affinity_key"] = _value(rng, 1)
    items = list(doc.items())
    rng.shuffle(items)
    text = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.3:
        text = text.replace(", ", ",\n  ").replace(": ", " :\t")
    elif rng.random() < 0.3:
        spaces = " " * rng.choice([16, 20, 40])
        text = text.replace(", ", spaces + "," + spaces).replace(": ", spaces + ":" + spaces)
        text = text.replace("[", "[" + spaces).replace("}", spaces + "}")
    if rng.random() < 0.2:
        text = f"[{text}, {text}]"
    return text.encode("utf-8", "surrogatepass")


def _mutated(rng: random.Random, raw: bytes) -> bytes:
    at = rng.randrange(len(raw) + 1)
    how = rng.randrange(3)
    if how == 0:
        return raw[:at] + raw[at + 1 :]
    if how == 1:
        return (
            raw[:at]
            + rng.choice([b",", b"]", b"}", b"[", b"{", b'"', b"\\", b":", b" ", b"0"])
            + raw[at:]
        )
    return raw[:at] + raw[at : at + 5] + raw[at:]


def body_refused(message: str) -> bool:
    """Whether a refusal is of the body as a whole (not of one field's value)."""
    return message.startswith(("request body is not valid JSON", "request body is nested"))


def well_formed(raw: bytes) -> bool:
    """Whether Python's json takes ``raw`` and it nests at most 64 levels."""
    return json_accepts(raw) and reference_depth(raw) <= jsonbody.MAX_DEPTH


def json_accepts(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _recorded(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """What each call of jsoncuts' function ``name`` returns, from now on, in order."""
    returned: list[Any] = []
    function = getattr(jsoncuts, name)

    def recording(*args: Any) -> Any:
        returned.append(result := function(*args))
        return result

    monkeypatch.setattr(jsoncuts, name, recording)
    return returned


@pytest.mark.parametrize(("piece", "reduce", "look"), [(1, 1, 1), (1, 2, 3), (2, 3, 64), (7, 5, 2)])
def test_pieces_read_alike_however_small(
    monkeypatch: pytest.MonkeyPatch, piece: int, reduce: int, look: int
) -> None:
    """Hundreds of documents (strings of commas, quotes, brackets, escapes, surrogate pairs
    and lone surrogates; NaN and Infinity; empty containers; runs of spaces; duplicate
    keys) and mutations of them, cut at every comma, inside strings and in runs of spaces:
    the same outcome as one check, accepted exactly when Python's json accepts (and 64
    levels hold), with json's values for the fields."""
    monkeypatch.setattr(jsoncuts, "PIECE", piece)
    monkeypatch.setattr(jsoncuts, "REDUCE", reduce)
    monkeypatch.setattr(jsoncuts, "LOOK", look)
    in_strings = _recorded(monkeypatch, "_in_string")
    in_spaces = _recorded(monkeypatch, "_in_spaces")
    rng = random.Random(piece * 1000 + reduce * 10 + look)
    refused = accepted = 0
    for _ in range(400):
        raw = _document(rng)
        for doc in (raw, _mutated(rng, raw), _mutated(rng, _mutated(rng, raw))):
            for fields in FIELD_SETS:
                got = outcome(doc, fields, pieces=True, monkeypatch=monkeypatch)
                assert got == outcome(doc, fields, pieces=False, monkeypatch=monkeypatch), doc
                assert (got[0] == "ok" or not body_refused(got[1])) is well_formed(doc)
                refused += got[0] == "refused"
                accepted += got[0] == "ok"
                if fields is protocol.DISPATCH and got[0] == "ok" and doc.startswith(b"{"):
                    model = json.loads(doc).get("model", [])
                    if not isinstance(model, (list, dict)):
                        assert got[1]["model"] == model
    assert refused > 100 and accepted > 100
    if look < 64:
        assert sum(cut is not None for cut in in_strings) > 100  # strings were cut too
        assert sum(cut is not None for cut in in_spaces) > 100  # and runs of spaces


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "junk": [1,,2]}',
        b'{"model": "m", "junk": [1,2,]}',
        b'{"model": "m", "junk": [,1]}',
        b'{"model": "m",, "junk": 1}',
        b'{"model": "m", "junk": {"a": 1,}}',
        b'{"model": "m", "junk": {"a",: 1}}',
        b'{"model": "m", "junk": [1 2]}',
        b'{"model": "m", "junk": [1, 2}',
        b'{"model": "m", "junk": [1, 2',
        b'{"model": "m", "junk": [1, 2]} ,',
        b'{"model": "m", "junk": [NaN, Infinity, -Infinity, "\\ud800", Nab]}',
        b'{"model": "m", "junk": ["a,\\"]", 1, "\\\\", 2]}',
        b'{"model": [1, 2, 3], "junk": [[], {}, [ ], { }]}',
        b'{"model": [1, 2, NaN], "junk": 1, "model": {"a": [1, 2]}}',
        b'{"model": "m", "junk": [1.5e, 2]}',
        b'{"model": "m", "junk": [tru, 2]}',
        b'{"model": "m", "junk": [1, 2]}, {"model": "n"}',
        b'[1, 2, [3, 4], {"a": [5, 6]}]',
        b'[1, 2, [3, 4], {"a": [5, 6]}',
        b"{" + b'"a":[' * 70 + b"1,2" + b"]}" * 70 + b"}",
        # msgspec reads a literal or an escape whole before it names what is wrong.
        b'{"model": "m", "junk": [1, t,1',
        b'{"model": "m", "junk": [1, fals, 1]}',
        b'{"model": "m", "junk": ["abc\\u{\\"", 1]}',
        b'{"model": "m", "junk": ["abcdefgh\\ud83d\\ude00\\ud83d", 1]}',
        b'{"model": "abcdefghijklmnopqrstuvwxyz", "junk": {"abcdefghijklmnop": "qrstuvwxyz"}}',
        # Runs of spaces: where a value, key or colon is due, and where one is missing.
        b'{"model"' + b" " * 40 + b': "m", "junk": [1' + b" " * 40 + b", [" + b" " * 40 + b"]]}",
        b'{"model": "m", "junk": {"k"' + b" " * 40 + b":" + b" " * 40 + b"1" + b" " * 40 + b"}}",
        b'{"model": "m", "junk": [1' + b" " * 40 + b"2]}",
        b'{"model": "m", "junk": {"k"' + b" " * 40 + b"1}}",
        b'{"model": "m", "junk": {"k":' + b" " * 40 + b"}}",
        b'{"model": "m", "junk": [' + b" " * 40 + b",1]}",
        b'{"model":' + b" " * 40 + b'"m"' + b" " * 40 + b"}" + b" " * 40,
        # An escape cut short is not JSON, though the surrogate escape it starts is marked.
        b'{"model": "m", "junk": ["\\ud80{0", "\\ud800", 1]}',
    ],
)
def test_cut_at_every_comma_reads_as_one_check(monkeypatch: pytest.MonkeyPatch, raw: bytes) -> None:
    """Hand-picked edges (commas missing, doubled or trailing; a comma after a key; a
    number or literal cut short; text after the end; NaN and lone surrogates beside a real
    error; commas inside strings; surrogate pairs; fields whose value a cut falls in; too
    deep): cut at every comma and every few bytes of a string, the same outcome, to the
    byte named in the message, as one check."""
    monkeypatch.setattr(jsoncuts, "PIECE", 1)
    monkeypatch.setattr(jsoncuts, "REDUCE", 1)
    monkeypatch.setattr(jsoncuts, "LOOK", 1)
    for fields in FIELD_SETS:
        got = outcome(raw, fields, pieces=True, monkeypatch=monkeypatch)
        assert got == outcome(raw, fields, pieces=False, monkeypatch=monkeypatch)
        assert (got[0] == "ok" or not body_refused(got[1])) is well_formed(raw)


UTF8_BITS = [b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"a", b","]
NOT_UTF8 = [b"\xc3", b"\x80", b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc0\xaf", b"\xf5"]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_utf8_is_checked_alike_however_the_body_is_cut(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A large body is checked as UTF-8 a slice at a time: characters of one to four bytes
    (lone surrogates too, as Python's json reads them) and broken ones anywhere, cut at
    every place, are refused with the very message one check of the whole gives."""
    monkeypatch.setattr(jsonpieces, "UTF8", size)
    rng = random.Random(size)
    refused = 0
    for _ in range(300):
        bits = [rng.choice(UTF8_BITS) for _ in range(rng.randrange(12))]
        if rng.random() < 0.6:
            bits.insert(rng.randrange(len(bits) + 1), rng.choice(NOT_UTF8))
        raw = b'{"model": "' + b"".join(bits) + b'", "junk": [1, 2]}'
        got = outcome(raw, protocol.DISPATCH, pieces=True, monkeypatch=monkeypatch)
        assert got == outcome(raw, protocol.DISPATCH, pieces=False, monkeypatch=monkeypatch)
        error = utf8_error(raw)
        if error is not None:
            assert got == ("refused", f"request body is not valid JSON: {error}")
            refused += 1
    assert refused > 100


def utf8_error(raw: bytes) -> UnicodeDecodeError | None:
    """What decoding ``raw`` as Python's json does raises, if anything."""
    try:
        raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        return e
    return None


@pytest.mark.parametrize("pieces", [True, False], ids=["in-pieces", "in-one-check"])
def test_a_body_gathered_in_a_bytearray_reads_as_its_bytes(
    monkeypatch: pytest.MonkeyPatch, pieces: bool
) -> None:
    """A body that arrived in several chunks is gathered in a bytearray as it arrives (one
    join of 63 MiB held the loop 45 ms): every document and mutation of the corpus, read
    from a bytearray, gives what the same bytes give, fields and messages alike."""
    monkeypatch.setattr(jsoncuts, "PIECE", 7)
    monkeypatch.setattr(jsoncuts, "REDUCE", 5)
    monkeypatch.setattr(jsoncuts, "LOOK", 2)
    monkeypatch.setattr(jsonpieces, "UTF8", 3)
    rng = random.Random(16)
    for _ in range(300):
        raw = _document(rng)
        if rng.random() < 0.3:
            raw = raw.replace(b'"', b'"\xff', 1) if rng.random() < 0.5 else b"\xef\xbb\xbf" + raw
        for doc in (raw, _mutated(rng, raw)):
            for fields in FIELD_SETS:
                got = outcome(bytearray(doc), fields, pieces=pieces, monkeypatch=monkeypatch)
                assert got == outcome(doc, fields, pieces=pieces, monkeypatch=monkeypatch), doc


def test_a_run_of_brackets_is_one_step_of_the_search_for_a_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A nest 10,000 deep before the first comma: the search for a place to cut reads
    each run of brackets as one step, so it finds that comma (its token limit once gave
    up after 4,096 brackets, one step each: a nest a million deep cost 4 ms per look)."""
    monkeypatch.setattr(jsoncuts, "PIECE", 16)
    nest = b"[" * 10_000 + b"]" * 10_000
    doc = b'{"model": "m", "junk": [' + nest + b"," + nest + b"]}"
    found = [cut.at for cut in jsoncuts.cuts(doc) if cut is not None]
    assert found == [doc.index(b"],[") + 1]
