"""Bad input: HTTP 400 with a JSON body naming the field and the problem, never 500, and the
registry left exactly as it was; bodies past max_body_size get 413."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import RunController

MAX_BODY = 4096
EXISTING = "http://127.0.0.1:9"
STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 2}


def reg(**fields: Any) -> bytes:
    """A registration body: a valid one for a new worker, with ``fields`` replaced."""
    body: dict[str, Any] = {
        "worker_name": "http://127.0.0.1:8",
        "check_heart_beat": True,
        "worker_status": {"model_names": ["new"], "speed": 1, "queue_length": 0},
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def status(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model_names": ["new"], "speed": 1, "queue_length": 0}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()

# (path, raw body, the field the answer must name (None: the body as a whole), a word of
# the problem the message must contain)
CASES = [
    # -- the body as a whole
    ("/register_worker", b'{"worker_name": ', None, "JSON"),
    ("/register_worker", b"\xff\xfe\x00{", None, "JSON"),
    ("/register_worker", b"[1, 2]", None, "object"),
    ("/register_worker", b'"text"', None, "object"),
    ("/register_worker", b"", None, "object"),
    ("/register_worker", b"[" * 100_000, None, "deep"),
    ("/register_worker", b'{"worker_name": ' + b"[" * 100_000, None, "deep"),
    ("/register_worker", b'{"worker_name": NaN}', "worker_name", "NaN"),
    ("/register_worker", b"NaN", None, "NaN"),
    ("/register_worker", b"9" * 5000, None, "JSON"),
    # -- registration fields
    ("/register_worker", reg(worker_name=DROP), "worker_name", "required"),
    ("/register_worker", reg(worker_name=5), "worker_name", "string"),
    ("/register_worker", reg(worker_name="not a url"), "worker_name", "URL"),
    ("/register_worker", reg(worker_name="ftp://10.0.0.5:21002"), "worker_name", "URL"),
    ("/register_worker", reg(worker_name="http://"), "worker_name", "URL"),
    ("/register_worker", reg(worker_name=""), "worker_name", "URL"),
    # Control characters would reach the log lines that name the worker.
    ("/register_worker", reg(worker_name="http://10.0.0.5:21002/\x1b[2J"), "worker_name", "URL"),
    ("/register_worker", reg(check_heart_beat=DROP), "check_heart_beat", "required"),
    ("/register_worker", reg(check_heart_beat="true"), "check_heart_beat", "true or false"),
    ("/register_worker", reg(check_heart_beat=1), "check_heart_beat", "true or false"),
    ("/register_worker", reg(multimodal="yes"), "multimodal", "true or false"),
    ("/register_worker", reg(worker_status=[1]), "worker_status", "object"),
    ("/register_worker", reg(worker_status="m"), "worker_status", "object"),
    (
        "/register_worker",
        reg(worker_status=status(model_names="m")),
        "worker_status.model_names",
        "list",
    ),
    (
        "/register_worker",
        reg(worker_status=status(model_names=["m", 3])),
        "worker_status.model_names",
        "list",
    ),
    (
        "/register_worker",
        reg(worker_status=status(model_names=DROP)),
        "worker_status.model_names",
        "required",
    ),
    ("/register_worker", reg(worker_status=status(speed=-1)), "worker_status.speed", "-1"),
    ("/register_worker", reg(worker_status=status(speed="fast")), "worker_status.speed", "number"),
    ("/register_worker", reg(worker_status=status(speed=True)), "worker_status.speed", "number"),
    # Too large for a float: must be refused, not overflow into a 500.
    ("/register_worker", reg(worker_status=status(speed=10**400)), "worker_status.speed", "10000"),
    (
        "/register_worker",
        reg(worker_status=status(speed=12345)).replace(b"12345", b"1e999"),
        "worker_status.speed",
        "inf",
    ),
    (
        "/register_worker",
        reg(worker_status=status(speed=12345)).replace(b"12345", b"-Infinity"),
        "worker_status.speed",
        "Infinity",
    ),
    (
        "/register_worker",
        reg(worker_status=status(queue_length="3")),
        "worker_status.queue_length",
        "whole number",
    ),
    (
        "/register_worker",
        reg(worker_status=status(queue_length=1.5)),
        "worker_status.queue_length",
        "whole number",
    ),
    (
        "/register_worker",
        reg(worker_status=status(queue_length=-1)),
        "worker_status.queue_length",
        "-1",
    ),
    (
        "/register_worker",
        reg(worker_status=status(queue_length=10**30)),
        "worker_status.queue_length",
        str(10**30),
    ),
    # A bad re-registration of an existing worker must not touch its entry.
    (
        "/register_worker",
        reg(worker_name=EXISTING, worker_status=status(speed=-5)),
        "worker_status.speed",
        "-5",
    ),
    # -- heartbeats
    ("/receive_heart_beat", b"{}", "worker_name", "required"),
    (
        "/receive_heart_beat",
        b'{"worker_name": "%s"}' % EXISTING.encode(),
        "queue_length",
        "required",
    ),
    (
        "/receive_heart_beat",
        b'{"worker_name": "%s", "queue_length": "3"}' % EXISTING.encode(),
        "queue_length",
        "whole number",
    ),
    (
        "/receive_heart_beat",
        b'{"worker_name": "%s", "queue_length": 1e300}' % EXISTING.encode(),
        "queue_length",
        "from 0",
    ),
    ("/receive_heart_beat", b'{"worker_name": 1, "queue_length": 0}', "worker_name", "string"),
    # NaN and Infinity are not JSON: the answer names the field that holds one.
    (
        "/receive_heart_beat",
        b'{"worker_name": "http://127.0.0.1:9", "queue_length": NaN}',
        "queue_length",
        "NaN",
    ),
    # -- model look-ups and generation
    ("/get_worker_address", b"{}", "model", "required"),
    ("/get_worker_address", b'{"model": ["m"]}', "model", "string"),
    ("/get_worker_address", b"[]", None, "object"),
    ("/worker_generate_stream", b'{"prompt": "hi"}', "model", "required"),
    ("/worker_generate_stream", b'{"model": null}', "model", "string"),
    ("/worker_generate_stream", b"{", None, "JSON"),
    ("/get_worker_address", b'{"model": Infinity}', "model", "Infinity"),
    ("/worker_generate_stream", b'{"model": -Infinity, "temperature": NaN}', "model", "Infinity"),
    # NaN or Infinity in a field the controller does not read is the worker's business, as
    # with FastChat's controller: tests/test_json_bounds.py forwards such bodies.
    # -- our extension
    ("/unregister_worker", b"{}", "worker_name", "required"),
    ("/unregister_worker", b'{"worker_name": 7}', "worker_name", "string"),
]


async def start(
    run_controller: RunController, http: aiohttp.ClientSession, **kw: Any
) -> Controller:
    """A controller holding one worker (EXISTING, serving "m"), so changes would show."""
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, **kw)
    controller = await run_controller(config)
    body = {"worker_name": EXISTING, "check_heart_beat": True, "worker_status": STATUS}
    async with http.post(f"{controller.url}/register_worker", json=body) as r:
        assert r.status == 200
    return controller


@pytest.fixture
async def controller(run_controller: RunController, http: aiohttp.ClientSession) -> Controller:
    return await start(run_controller, http)


@pytest.fixture
async def small(run_controller: RunController, http: aiohttp.ClientSession) -> Controller:
    """Like ``controller``, with both body limits at MAX_BODY."""
    return await start(run_controller, http, max_body_size=MAX_BODY, max_control_body_size=MAX_BODY)


async def snapshot(http: aiohttp.ClientSession, controller: Controller) -> Any:
    """What a user (and the dispatcher) can see of the registry."""
    async with http.post(f"{controller.url}/list_models") as r:
        listed = await r.json()
    workers = [(w.info, w.queue_length) for w in controller.registry]
    return listed, len(controller.registry), workers


@pytest.mark.parametrize(
    ("path", "body", "field", "problem"),
    CASES,
    ids=[f"{path}-{i}" for i, (path, *_) in enumerate(CASES)],
)
async def test_bad_input_gets_400_naming_the_field_and_changes_nothing(
    controller: Controller,
    http: aiohttp.ClientSession,
    path: str,
    body: bytes,
    field: str | None,
    problem: str,
) -> None:
    """Malformed or mistyped input gets 400 with {error, field, message}; the registry is as was."""
    before = await snapshot(http, controller)
    async with http.post(
        f"{controller.url}{path}", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/json"
        answer = await r.json()
    assert answer["error"] == "bad_request"
    assert answer["field"] == field
    assert isinstance(answer["message"], str)
    assert problem in answer["message"]
    assert await snapshot(http, controller) == before


@pytest.mark.parametrize(
    "path", ["/register_worker", "/receive_heart_beat", "/list_models", "/worker_generate_stream"]
)
async def test_body_past_max_body_size_gets_413(
    small: Controller, http: aiohttp.ClientSession, path: str
) -> None:
    """A body larger than max_body_size is refused with 413 and changes nothing."""
    before = await snapshot(http, small)
    big = json.dumps(
        {"worker_name": EXISTING, "queue_length": 0, "model": "m", "pad": "x" * MAX_BODY}
    ).encode()
    async with http.post(f"{small.url}{path}", data=big) as r:
        assert r.status == 413
    assert await snapshot(http, small) == before


async def test_control_and_generation_bodies_have_limits_of_their_own(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A registration past max_control_body_size gets 413, sent whole or in chunks without
    a length, while a generation body of the same size is within max_body_size."""
    controller = await start(
        run_controller, http, max_body_size=64 * MAX_BODY, max_control_body_size=MAX_BODY
    )
    before = await snapshot(http, controller)
    big = reg(pad="x" * MAX_BODY)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async with http.post(f"{controller.url}/register_worker", data=big) as r:
        assert r.status == 413
        assert "max_control_body_size" in (await r.json())["message"]
    async with http.post(f"{controller.url}/register_worker", data=pieces()) as r:
        assert r.status == 413
        answer = await r.json()
    assert answer == {
        "error": "payload_too_large",
        "field": None,
        "message": f"request body is larger than {MAX_BODY} bytes (max_control_body_size)",
    }
    assert await snapshot(http, controller) == before
    generation = json.dumps({"model": "nobody-serves-this", "pad": "x" * MAX_BODY})
    async with http.post(f"{controller.url}/worker_generate_stream", data=generation) as r:
        assert r.status == 200
        assert b"50005" in await r.read()


async def test_body_just_under_max_body_size_is_accepted(
    small: Controller, http: aiohttp.ClientSession
) -> None:
    """A body within max_body_size is read normally (the limit is not off by much)."""
    body = {"worker_name": EXISTING, "queue_length": 0, "pad": ""}
    body["pad"] = "x" * (MAX_BODY - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == MAX_BODY
    async with http.post(f"{small.url}/receive_heart_beat", data=raw) as r:
        assert r.status == 200
        assert await r.json() == {"exist": True}


@pytest.mark.parametrize(
    "encoding",
    ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"],
)
async def test_body_in_any_encoding_json_reads_is_read_alike(
    controller: Controller, http: aiohttp.ClientSession, encoding: str
) -> None:
    """A body in any encoding json.loads(bytes) reads (UTF-8 with or without a BOM, UTF-16,
    UTF-32, with or without a BOM) is dispatched like its UTF-8 original."""
    for body in ({"model": "m"}, {"model": "m", "affinity_key": "k€"}):
        raw = json.dumps(body, ensure_ascii=False).encode(encoding)
        async with http.post(f"{controller.url}/get_worker_address", data=raw) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"address": EXISTING}
