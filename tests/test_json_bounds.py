"""Request bodies are read within bounds (issue 16): nesting past 64 levels is a 400, every
body Python's json took is still taken (NaN, Infinity, lone surrogates) and forwarded as
it came, and a large hostile body is read in pieces while other clients are served."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
from collections.abc import Generator
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig, jsonbody, nesting
from controller.errors import BadRequestError
from controller.protocol import DISPATCH, REGISTER

from .conftest import FakeWorker, MakeWorker, RunController, register, split_stream

MODEL = "m"


def nest(levels: int, kind: str) -> bytes:
    """A value nesting ``levels`` containers: arrays, objects or both in turn."""
    out = b"1"
    for level in range(levels):
        use_object = kind == "objects" or (kind == "mixed" and level % 2)
        out = b'{"a": ' + out + b"}" if use_object else b"[" + out + b"]"
    return out


def generation(levels: int, kind: str = "arrays", pad: int = 0) -> bytes:
    """A generation body nesting ``levels`` levels in all (the body's own object is one)."""
    filler = b"[[" * 8 + b"]]" * 8
    junk = b", ".join([filler] * (pad // (len(filler) + 2))) if pad else b"0"
    return b'{"model": "m", "junk": [' + junk + b'], "x": ' + nest(levels - 1, kind) + b"}"


@pytest.fixture
async def served(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> tuple[Controller, FakeWorker]:
    controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
    worker = await make_worker()
    await register(http, controller, worker)
    return controller, worker


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    # aiohttp warns about large bytes bodies (they are copied in one go), not file objects.
    data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("kind", ["arrays", "objects", "mixed"])
@pytest.mark.parametrize("pad", [0, 3 * 1024 * 1024], ids=["small", "3MiB"])
async def test_generation_nesting_64_levels_is_relayed_and_65_is_refused(
    served: tuple[Controller, FakeWorker], http: aiohttp.ClientSession, kind: str, pad: int
) -> None:
    """64 levels reach the worker byte for byte; 65 get a 400 naming the limit and the
    worker never sees them, for small bodies and for large ones read in pieces."""
    controller, worker = served
    url = f"{controller.url}/worker_generate_stream"
    ok = generation(64, kind, pad)
    status, answer = await post(http, url, ok)
    assert status == 200
    assert split_stream(answer)[-1]["error_code"] == 0
    assert worker.stream_bodies == [ok]
    status, answer = await post(http, url, generation(65, kind, pad))
    assert status == 400
    refusal = json.loads(answer)
    assert refusal["field"] is None
    assert "nested too deeply" in refusal["message"]
    assert "64" in refusal["message"]
    assert worker.stream_bodies == [ok]


@pytest.mark.parametrize("path", ["/register_worker", "/receive_heart_beat", "/get_worker_address"])
async def test_control_bodies_nesting_past_64_levels_are_refused(
    served: tuple[Controller, FakeWorker], http: aiohttp.ClientSession, path: str
) -> None:
    """The control endpoints hold the same limit: 65 levels are a 400, 64 are read."""
    controller, worker = served
    fields = {
        "/register_worker": b'"worker_name": "%s", "check_heart_beat": true, '
        b'"worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0}'
        % worker.url.encode(),
        "/receive_heart_beat": b'"worker_name": "%s", "queue_length": 0' % worker.url.encode(),
        "/get_worker_address": b'"model": "m"',
    }[path]
    for levels, expected in ((64, 200), (65, 400)):
        body = b"{" + fields + b', "x": ' + nest(levels - 1, "mixed") + b"}"
        status, answer = await post(http, f"{controller.url}{path}", body)
        assert status == expected, answer
    assert "nested too deeply" in json.loads(answer)["message"]
    assert [w.info.name for w in controller.registry] == [worker.url]


async def test_brackets_inside_strings_do_not_nest(
    served: tuple[Controller, FakeWorker], http: aiohttp.ClientSession
) -> None:
    """Brackets in strings, escaped quotes and backslashes around them are text, not
    nesting: such a body with 200 brackets in strings is relayed."""
    controller, worker = served
    body = (
        b'{"model": "m", "a": "' + b"[{" * 100 + b'", "b": "\\"' + b"[" * 70 + b'\\\\", '
        b'"c": ["\\\\\\"]]]", "' + b"{" * 70 + b'"]}'
    )
    assert json.loads(body)  # valid, and nesting three levels
    status, _ = await post(http, f"{controller.url}/worker_generate_stream", body)
    assert status == 200
    assert worker.stream_bodies == [body]


PYTHON_ONLY = [
    b'{"model": "m", "temperature": NaN}',
    b'{"model": "m", "params": {"stop_token_ids": [2, -Infinity]}, "top_p": Infinity}',
    b'{"model": "m", "prompt": "broken emoji \\ud83d, lone low \\udc00, escaped \\\\ud800"}',
    # A lone surrogate as raw UTF-8 bytes, which Python's json reads with surrogatepass.
    b'{"model": "m", "prompt": "\xed\xa0\x80"}',
    b'{"prompt": "NaN and Infinity in a string", "model": "m", "x": [NaN, "\\uD800"]}',
    # Large enough to be read in pieces, with a token at either end.
    b'{"x": NaN, "model": "m", "junk": [' + b'{"a": [1, 2]}, ' * 200_000 + b"-Infinity]}",
]


@pytest.mark.parametrize("body", PYTHON_ONLY, ids=range(len(PYTHON_ONLY)))
async def test_bodies_python_json_takes_are_forwarded_byte_identical(
    served: tuple[Controller, FakeWorker], http: aiohttp.ClientSession, body: bytes
) -> None:
    """NaN, Infinity, -Infinity and lone surrogates, which FastChat clients may send and
    Python's json takes, reach the worker exactly as sent."""
    controller, worker = served
    status, answer = await post(http, f"{controller.url}/worker_generate_stream", body)
    assert status == 200, answer
    assert split_stream(answer)[-1]["error_code"] == 0
    assert worker.stream_bodies == [body]
    assert controller.bodies.counts.marked >= (b"NaN" in body or b"\\ud" in body.lower())


async def test_fields_read_are_the_text_sent_when_tokens_are_marked(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A model named with the very words that are marked elsewhere in the body is read
    as sent (placeholders never leak into a field), and its worker gets the request."""
    controller = await run_controller(ControllerConfig(host="127.0.0.1", port=0))
    worker = await make_worker(model_names=["NaN-Infinity [1] \\u005f"])
    await register(http, controller, worker)
    body = (
        b'{"temperature": NaN, "model": "NaN-Infinity [1] \\\\u005f", "x": "\\ud800", '
        b'"y": -Infinity}'
    )
    status, answer = await post(http, f"{controller.url}/worker_generate_stream", body)
    assert status == 200, answer
    assert worker.stream_bodies == [body]


async def test_a_hostile_body_is_read_while_other_clients_are_answered(
    served: tuple[Controller, FakeWorker], http: aiohttp.ClientSession
) -> None:
    """4 MiB of tiny objects and deep nests is checked by msgspec in one pass, never by
    Python's json, and in pieces: each pause lets another client's /get_worker_address be
    answered before the reading goes on."""
    controller, worker = served
    answered = 0
    answered_now = asyncio.Event()
    done = False

    async def other_client() -> None:
        nonlocal answered
        while not done:
            async with http.post(
                f"{controller.url}/get_worker_address", json={"model": MODEL}
            ) as r:
                assert await r.json() == {"address": worker.url}
            answered += 1
            answered_now.set()

    at_pause: list[int] = []

    async def pause() -> None:
        # Resume only once the other client got an answer since the last pause.
        answered_now.clear()
        await asyncio.wait_for(answered_now.wait(), timeout=10)
        at_pause.append(answered)

    controller.bodies.pause = pause
    hostile = (
        b'{"model": "nobody-serves-this", "junk": ['
        + b"{}, " * 800_000
        + b", ".join([b"[" * 60 + b"]" * 60] * 12_000)
        + b"]}"
    )
    assert len(hostile) > 4 * 1024 * 1024
    client = asyncio.create_task(other_client())
    try:
        status, answer = await post(http, f"{controller.url}/worker_generate_stream", hostile)
    finally:
        done = True
        await client
    assert status == 200
    assert split_stream(answer) == [{"text": split_stream(answer)[0]["text"], "error_code": 50005}]
    counts = controller.bodies.counts
    assert counts.marked == 0
    assert counts.pauses == len(at_pause) >= 5
    assert at_pause == sorted(set(at_pause))  # an answer between every two pieces


# -- the readers on their own ------------------------------------------------------------


def reference_depth(text: bytes) -> int:
    """Nesting depth the slow, obvious way."""
    depth = deepest = 0
    inside = escaped = False
    for ch in text.decode("utf-8", "surrogatepass"):
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
        elif ch == '"':
            inside = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def random_value(r: random.Random, depth: int, deepest: int) -> Any:
    if depth >= deepest or r.random() < 0.25:
        return r.choice([1, -2.5, None, True, "a[b", '\\"[', "x\\\\", '"]]"', "{", "[]{}", "NaN"])
    width = r.choice([0, 1, 1, 1, 2, 3]) if depth > 3 else r.randint(0, 4)
    if r.random() < 0.5:
        return [random_value(r, depth + 1, deepest) for _ in range(width)]
    keys = ["k", "[", '\\"{', "model"]
    return {f"{r.choice(keys)}{i}": random_value(r, depth + 1, deepest) for i in range(width)}


def run(steps: Generator[None, None, Any]) -> Any:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@pytest.mark.parametrize("slice_size", [nesting.SLICE, 7, 64])
def test_nesting_matches_a_plain_count(monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    """Random documents (strings full of brackets, quotes and backslashes, shapes deep and
    bushy) measured in slices of any size agree with counting character by character,
    at the limit and one level either side of it."""
    monkeypatch.setattr(nesting, "SLICE", slice_size)
    r = random.Random(16)
    checked = 0
    for _ in range(600):
        text = json.dumps(random_value(r, 0, r.randint(0, 80))).encode()
        depth = reference_depth(text)
        for limit in {max(depth - 1, 0), depth, 64}:
            assert run(nesting.within(text, limit)) == (depth <= limit), (limit, text[:200])
            checked += 1
    assert checked > 1200


def expected_fields(body: bytes, names: tuple[str, ...]) -> dict[str, Any] | str:
    """What the controller's parse functions should see of ``body``, from json.loads; a
    field holding NaN or Infinity as the name of the refused field."""
    whole = json.loads(body)
    found = {}
    for name in names:
        if name not in whole:
            continue
        value = whole[name]
        if isinstance(value, float) and not math.isfinite(value):
            return name
        if isinstance(value, list):
            value = [None] if value else []
        elif isinstance(value, dict):
            value = {"": None} if value else {}
        found[name] = value
    return found


def test_fields_are_what_json_loads_gives() -> None:
    """Over random bodies with NaN, Infinity and surrogates anywhere, the fields read are
    exactly json.loads's (containers by their kind), and NaN in one is refused by name."""
    r = random.Random(15)
    specials = ["NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udfff x"', '"NaN \\uD83D"']
    for _ in range(400):
        doc = random_value(r, 1, 6)
        members = [
            f'"{k}": {json.dumps(v)}' for k, v in (doc if isinstance(doc, dict) else {}).items()
        ]
        for name in ("model", "affinity_key"):
            if r.random() < 0.7:
                value = r.choice([*specials, json.dumps(random_value(r, 1, 3)), '"m[1]"'])
                members.insert(r.randint(0, len(members)), f'"{name}": {value}')
        members.insert(r.randint(0, len(members)), f'"x": {r.choice(specials)}')
        body = ("{" + ", ".join(members) + "}").encode()
        expected = expected_fields(body, ("model", "affinity_key"))
        if isinstance(expected, str):
            with pytest.raises(BadRequestError) as refused:
                jsonbody.read(body, DISPATCH)
            assert "is not a JSON number" in refused.value.problem
        else:
            assert jsonbody.read(body, DISPATCH) == expected, body


def test_a_status_longer_than_allowed_is_not_decoded_item_by_item() -> None:
    """A model list past the limit comes back as its length only (refused by count)."""
    names = b", ".join([b"NaN"] + [b'"n"'] * 5000)
    body = b'{"worker_name": "http://10.0.0.5:1", "check_heart_beat": true, ' + (
        b'"worker_status": {"model_names": [%s], "speed": 1, "queue_length": 0}}' % names
    )
    read = jsonbody.read(body, REGISTER, max_items=1024)
    assert read["worker_status"]["model_names"] == [None] * 5001


@pytest.mark.parametrize("escape", [b"\\ud80{", b"\\uD8", b"\\udzzz"])
def test_a_surrogate_escape_cut_short_is_refused_beside_a_marked_one(escape: bytes) -> None:
    """A body holding a lone surrogate (so it is checked with its tokens marked) and an
    escape "\\ud..." without its four hex digits is not JSON, as Python's json says: only
    whole escapes are marked (a cut-short one was made valid by its placeholder)."""
    body = b'{"model": "m", "x": ["\\ud800", "' + escape + b'0"]}'
    with pytest.raises(json.JSONDecodeError, match="Invalid"):
        json.loads(body)
    with pytest.raises(BadRequestError) as refused:
        jsonbody.read(body, DISPATCH)
    assert refused.value.problem.startswith("request body is not valid JSON")
