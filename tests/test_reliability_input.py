"""Hostile input: malformed requests on every endpoint get 4xx, never 5xx, and change nothing."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from controller import Controller, ControllerConfig
from controller.edge.handlers import add_routes

from .conftest import FakeWorker, MakeWorker, RunController, register_body, wait_until

MAX_BODY = 16 * 1024
FUZZ_REQUESTS = 1200
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


@attrs.frozen
class Case:
    """One hostile request and what a correct controller may answer to it."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = attrs.Factory(dict)
    skip_content_type: bool = False
    #: send the body in this many chunks, ``trickle`` seconds apart (chunked encoding)
    chunks: int = 0
    trickle: float = 0.0
    allowed: frozenset[int] = frozenset({400})
    note: str = ""


def routes(controller: Controller) -> dict[str, str]:
    """Every path the controller serves, with its method."""
    app = web.Application()
    add_routes(
        app,
        registry=controller.registry,
        router=controller.router,
        relay=controller.relay,
        prober=controller.prober,
    )
    found = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if "path" in info:
            found[info["path"]] = route.method
    return found


class Fuzzer:
    """A small seeded generator of malformed requests (hypothesis is not a dependency)."""

    def __init__(self, rng: random.Random, routes: dict[str, str], known: dict[str, Any]) -> None:
        self.rng = rng
        self.routes = routes
        self.posts = sorted(p for p, m in routes.items() if m == "POST")
        #: names and models that are registered: used only in invalid positions
        self.known = known

    # -- values --------------------------------------------------------------------------

    def junk_string(self) -> str:
        """A string that is never a registered name or model, nor a worker URL."""
        r = self.rng
        pieces = [
            "zz",
            "\ud800",
            "\udfff",
            "\ud83d",
            "\u0000",
            "\u202e",
            "\ufeff",
            "💥",
            "\\",
            '"',
            "\n",
            "%00",
            "../",
            "ftp://x",
            " ",
            "ä" * r.randint(1, 50),
            "x" * r.choice([1, 100, 5000]),
        ]
        return "zz" + "".join(r.choices(pieces, k=r.randint(1, 6)))

    def wrong_scalar(self) -> Any:
        r = self.rng
        return r.choice(
            [
                None,
                True,
                False,
                -1,
                0.5,
                -0.0,
                10**30,
                -(10**30),
                1e308,
                [],
                [1, 2],
                {},
                {"a": None},
                [[[[]]]],
                "",
                self.junk_string(),
            ]
        )

    def wrong_count(self) -> Any:
        """A value that is not a queue length: wrong type, negative, too big, fractional."""
        return self.rng.choice(
            [-1, -(10**20), 10**10, 10**400, 1.5, True, None, "3", [3], {"n": 3}, 1e300]
        )

    def wrong_bool(self) -> Any:
        return self.rng.choice([0, 1, "true", "false", None, [], {}, [True], 1.0])

    def wrong_url(self) -> Any:
        r = self.rng
        return r.choice(
            [
                "",
                "localhost:21002",
                "ftp://127.0.0.1:1",
                "http://",
                "http:// 127.0.0.1",
                "http://127.0.0.1:99999",
                "http://[::1",
                "//127.0.0.1:1",
                "http://127.0.0.1:1/a b",
                self.junk_string(),
                r.choice(sorted(self.known["names"])) + "\n",
                self.wrong_scalar() or 0,
            ]
        )

    def wrong_status(self) -> Any:
        r = self.rng
        valid: dict[str, Any] = {"model_names": ["zz"], "speed": 1, "queue_length": 0}
        key = r.choice(list(valid))
        bad = dict(valid)
        if r.random() < 0.3:
            del bad[key]
        elif key == "model_names":
            bad[key] = r.choice(["zz", [""], [1], [None], [["zz"]], {"zz": 1}, None, 5])
        elif key == "speed":
            bad[key] = r.choice([-1, "1", None, [1], 1e13, True, 10**400])
        else:
            bad[key] = self.wrong_count()
        return r.choice([bad, bad, [bad], "status", 7, True])

    def nested(self, depth: int) -> str:
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        inner = "1" if opener.startswith("{") else ""
        return opener * depth + inner + closer * depth

    # -- bodies --------------------------------------------------------------------------

    def invalid_body(self, path: str) -> tuple[bytes, str]:
        """A body that must be refused (400) by an endpoint that parses ``path``'s fields."""
        r = self.rng
        kind = r.choice(
            [
                "syntax",
                "top_level",
                "fields",
                "fields",
                "fields",
                "duplicate",
                "nested",
                "binary",
                "bad_utf8",
                "huge_number",
            ]
        )
        if kind == "syntax":
            text = r.choice(
                [
                    "{",
                    "}",
                    '{"model": }',
                    "{'model': 'm'}",
                    '{"model": "m",}',
                    '{"model": NaN}',
                    '{"model": Infinity}',
                    '{"model": -Infinity}',
                    '{"model": "m"} trailing',
                    '{"model": "m" /* c */}',
                    '{"model": "\\x41"}',
                    '{"model": "\\ud800',
                    "\x00",
                    '{"model": undefined}',
                    "[" * 10,
                ]
            )
            return text.encode(), kind
        if kind == "top_level":
            text = r.choice(["[]", '"m"', "1", "true", "false", "null", '["model", "m"]', "1e999"])
            return text.encode(), kind
        if kind == "nested":
            depth = r.choice([50, 500, 990, 1000, 1010, 5000, 100_000])
            key = r.choice(self.fields(path) or ["model"])
            text = f'{{"{key}": {self.nested(depth)}}}' if r.random() < 0.5 else self.nested(depth)
            return text.encode(), kind
        if kind == "binary":
            return r.randbytes(r.randint(1, 2000)), kind
        if kind == "bad_utf8":
            return r.choice([b'{"model": "\xff\xfe"}', b"\xc3\x28", b'{"model": "\xc0\xaf"}']), kind
        if kind == "huge_number":
            digits = "9" * r.choice([400, 4300, 5000, 20000])
            return f'{{"model": {digits}, "queue_length": {digits}}}'.encode(), kind
        obj = self.invalid_fields(path)
        if kind == "duplicate":
            # The last duplicate wins in Python's json: make the last one the invalid one.
            pairs = [json.dumps(k) + ": " + json.dumps(self.valid_field(k)) for k in obj]
            pairs += [json.dumps(k) + ": " + json.dumps(v) for k, v in obj.items()]
            return ("{" + ", ".join(pairs) + "}").encode(), kind
        return json.dumps(obj).encode(), kind

    def fields(self, path: str) -> list[str]:
        return {
            "/register_worker": ["worker_name", "check_heart_beat", "worker_status", "multimodal"],
            "/receive_heart_beat": ["worker_name", "queue_length"],
            "/unregister_worker": ["worker_name"],
        }.get(path, ["model", "affinity_key"])

    def valid_field(self, key: str) -> Any:
        """A valid value that, alone, can change nothing (unknown names and models)."""
        return {
            "worker_name": "http://127.0.0.1:1",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["zz"], "speed": 1, "queue_length": 0},
            "multimodal": False,
            "queue_length": 0,
            "model": "zz-unknown",
            "affinity_key": "k",
        }.get(key, "zz")

    def required(self, path: str) -> list[str]:
        return {
            "/register_worker": ["worker_name", "check_heart_beat"],
            "/receive_heart_beat": ["worker_name", "queue_length"],
            "/unregister_worker": ["worker_name"],
        }.get(path, ["model"])

    def not_a_string(self) -> Any:
        value = self.rng.choice(
            [self.wrong_scalar(), [self.rng.choice(sorted(self.known["models"]))]]
        )
        return [value] if isinstance(value, str) else value

    def invalid_fields(self, path: str) -> dict[str, Any]:
        """An object with at least one field invalid (a required one missing, or mistyped)."""
        r = self.rng
        fields = self.fields(path)
        obj = {k: self.valid_field(k) for k in fields if r.random() < 0.7}
        if r.random() < 0.25:
            obj.pop(r.choice(self.required(path)), None)
            obj["zz_extra"] = self.junk_string()
            return obj
        target = r.choice(fields)
        if target == "worker_name":
            if path == "/register_worker":
                obj[target] = self.wrong_url()
            else:
                # Even a registered name is refused when it is not a string.
                obj[target] = r.choice([[r.choice(sorted(self.known["names"]))], None, 5, {}])
        elif target in ("check_heart_beat", "multimodal"):
            value = self.wrong_bool()
            # null is how an optional field says "absent", which is valid.
            obj[target] = 0 if value is None and target == "multimodal" else value
        elif target == "worker_status":
            obj[target] = self.wrong_status()
        elif target == "queue_length":
            # Aimed at a registered worker: a bad heartbeat must not touch it.
            obj["worker_name"] = r.choice(sorted(self.known["names"]))
            obj[target] = self.wrong_count()
        else:
            value = self.not_a_string()
            obj[target] = 0 if value is None and target == "affinity_key" else value
        return obj

    # -- cases ---------------------------------------------------------------------------

    def case(self) -> Case:
        r = self.rng
        roll = r.random()
        if roll < 0.06:
            return self.wrong_method()
        if roll < 0.09:
            return self.unknown_path()
        if roll < 0.13:
            return self.oversized()
        if roll < 0.16:
            return self.query_case()
        path = r.choice(self.posts)
        body, kind = self.invalid_body(path)
        headers: dict[str, str] = {}
        skip = False
        header_roll = r.random()
        if header_roll < 0.2:
            skip = True
        elif header_roll < 0.4:
            headers["Content-Type"] = r.choice(
                [
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=zz",
                    "application/json; charset=latin-1",
                    "",
                ]
            )
        else:
            headers["Content-Type"] = "application/json"
        chunks, trickle = 0, 0.0
        if r.random() < 0.03:
            chunks, trickle = r.randint(2, 5), 0.01
        allowed = self.answers(path)
        if len(body) > MAX_BODY:
            allowed |= {413}
        return Case("POST", path, body, headers, skip, chunks, trickle, allowed, note=kind)

    def answers(self, path: str) -> frozenset[int]:
        """What an endpoint may answer to a malformed body."""
        if path in ("/register_worker", "/receive_heart_beat", "/unregister_worker"):
            return frozenset({400})
        if path in self.fields_free():
            # Endpoints that take no body ignore what it holds.
            return frozenset({200})
        return frozenset({400})

    def fields_free(self) -> set[str]:
        return {
            "/refresh_all_workers",
            "/list_models",
            "/list_multimodal_models",
            "/list_language_models",
            "/worker_get_status",
        }

    def wrong_method(self) -> Case:
        r = self.rng
        path, method = r.choice(sorted(self.routes.items()))
        other = r.choice([m for m in METHODS if m != method])
        body = r.choice([None, b"{}", r.randbytes(50)])
        return Case(other, path, body, allowed=frozenset({405}), note="wrong method")

    def unknown_path(self) -> Case:
        r = self.rng
        path = r.choice(
            [
                "/",
                "/register_worker/",
                "/REGISTER_WORKER",
                "/worker_generate_stream/x",
                "/%00",
                "/..%2f..%2fetc%2fpasswd",
                "/" + "a" * 2000,
                "/v1/chat/completions",
                "/test_connection/../list_models/x",
            ]
        )
        return Case(r.choice(["GET", "POST"]), path, b"{}", allowed=frozenset({404}))

    def oversized(self) -> Case:
        r = self.rng
        path = r.choice(self.posts)
        size = r.choice([MAX_BODY + 1, MAX_BODY * 2, MAX_BODY * 32])
        body = b'{"model": "' + b"x" * size + b'"}'
        chunks = r.choice([0, 0, 8])
        return Case(
            "POST", path, body, chunks=chunks, allowed=frozenset({413}), note=f"oversized {size}"
        )

    def query_case(self) -> Case:
        r = self.rng
        gets = sorted(p for p, m in self.routes.items() if m == "GET")
        path = r.choice(gets)
        value = r.choice(["-1", "x", "1e3", "²", "٣", "9" * 5000, "%00", "", "0x10", "1.5"])
        return Case(
            "GET",
            f"{path}?n={value}",
            None,
            allowed=frozenset({200, 400}),
            note="query",
        )


async def send(http: aiohttp.ClientSession, base: str, case: Case) -> tuple[int, bytes]:
    data: bytes | AsyncIterator[bytes] | None = case.body
    if case.chunks and case.body is not None:
        data = trickled(case.body, case.chunks, case.trickle)
    skip = ("Content-Type",) if case.skip_content_type else ()
    async with http.request(
        case.method,
        base + case.path,
        data=data,
        headers=case.headers,
        skip_auto_headers=skip,
    ) as r:
        return r.status, await r.read()


async def trickled(body: bytes, chunks: int, delay: float) -> AsyncIterator[bytes]:
    """A slow client: the body in ``chunks`` pieces, ``delay`` apart (load, not sync)."""
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        if i:
            await asyncio.sleep(delay)
        yield body[i : i + step]


def snapshot(controller: Controller) -> list[tuple[Any, ...]]:
    return [
        (
            w.name,
            w.info,
            w.queue_length,
            w.consecutive_failures,
            controller.registry.is_ejected(w),
        )
        for w in controller.registry
    ]


@pytest.fixture
async def guarded(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
) -> tuple[Controller, list[FakeWorker]]:
    """A controller with two registered workers and small body limits."""
    config = ControllerConfig(
        host="127.0.0.1", port=0, max_body_size=MAX_BODY, max_control_body_size=MAX_BODY
    )
    controller = await run_controller(config)
    workers = [
        await make_worker(model_names=["m"], queue_length=2),
        await make_worker(model_names=["m", "vision"], queue_length=0),
    ]
    for worker in workers:
        body = register_body(worker, multimodal=worker.model_names == ["m", "vision"])
        async with http.post(f"{controller.url}/register_worker", json=body) as r:
            assert r.status == 200
    return controller, workers


def no_traceback(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    return "Traceback" not in text and 'File "' not in text and "Error:" not in text[:200]


async def test_fuzzed_requests_get_4xx_and_leave_the_registry_alone(
    guarded: tuple[Controller, list[FakeWorker]],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1,200 seeded malformed requests on every endpoint: no 5xx, no traceback, no change."""
    controller, workers = guarded
    caplog.set_level(logging.WARNING)
    seed = int(os.environ.get("FC_RELIABILITY_SEED", random.randrange(2**32)))
    print(f"\nFC_RELIABILITY_SEED={seed}")
    served = routes(controller)
    known = {"names": {w.url for w in workers}, "models": {"m", "vision"}}
    fuzzer = Fuzzer(random.Random(seed), served, known)
    cases = [fuzzer.case() for _ in range(FUZZ_REQUESTS)]
    before = snapshot(controller)
    limit = asyncio.Semaphore(20)
    failures: list[str] = []

    async def check(case: Case) -> None:
        async with limit:
            status, body = await send(http, controller.url, case)
        problem = None
        if status >= 500 or status not in case.allowed:
            problem = f"HTTP {status} (allowed {sorted(case.allowed)})"
        elif not no_traceback(body):
            problem = "traceback in body"
        elif status in (400, 413) and case.path in served:
            answer = json.loads(body)
            if set(answer) != {"error", "field", "message"}:
                problem = f"unexpected error body {answer}"
        if problem:
            shown = (case.body or b"")[:80]
            failures.append(f"{problem}: {case.method} {case.path[:60]} {case.note} {shown!r}")

    async with asyncio.timeout(60):
        await asyncio.gather(*(check(case) for case in cases))

    assert failures == [], f"seed {seed}: {len(failures)} failures, first: {failures[:10]}"
    assert snapshot(controller) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    async with http.get(f"{controller.url}/test_connection") as r:
        assert await r.json() == "success"
    covered = {c.path.partition("?")[0] for c in cases}
    assert set(served) <= covered, f"endpoints never fuzzed: {set(served) - covered}"


# -- raw HTTP that no client library would send ------------------------------------------

RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS hello on plain HTTP
    b"POST /list_models HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /list_models HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n{}\r\n0\r\n\r\n",
    b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"POST /get_worker_address HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /get_worker_address\r\n\r\n",
    b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}",
    b"GET /test_connection HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
]


async def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        if not request.endswith(b"{}"):
            writer.write_eof()
        else:
            # A client announcing more body than it sends, then going away.
            writer.close()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("raw", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
async def test_malformed_http_gets_4xx_or_a_closed_connection(
    guarded: tuple[Controller, list[FakeWorker]],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
) -> None:
    """Broken HTTP framing is answered with a 4xx (or the connection closed), never a 5xx."""
    controller, _ = guarded
    caplog.set_level(logging.WARNING)
    before = snapshot(controller)

    answer = await raw_exchange(controller.url, raw)

    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 4"), answer[:200]
        assert no_traceback(answer)
    assert snapshot(controller) == before
    # aiohttp itself logs broken framing at ERROR (with the parser's exception); nothing
    # else may log an error.
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and not (r.exc_info and isinstance(r.exc_info[1], HttpProcessingError))
    ]
    assert [r.getMessage() for r in errors] == []
    async with http.get(f"{controller.url}/test_connection") as r:
        assert await r.json() == "success"


# -- the body size limit -----------------------------------------------------------------


async def chunks_of(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BodySender = Callable[[bytes], bytes | AsyncIterator[bytes]]


@pytest.mark.parametrize(
    "sender",
    [
        pytest.param(lambda body: body, id="content-length"),
        pytest.param(lambda body: chunks_of(body, 1000), id="chunked"),
    ],
)
async def test_body_past_the_limit_gets_413_on_every_endpoint(
    guarded: tuple[Controller, list[FakeWorker]],
    http: aiohttp.ClientSession,
    sender: BodySender,
) -> None:
    """One byte past max_body_size is a 413 with a JSON body; at the limit it is read."""
    controller, _ = guarded
    posts = sorted(p for p, m in routes(controller).items() if m == "POST")
    at_limit = b'{"model": "zz"}'.ljust(MAX_BODY)
    past = at_limit + b" "

    for path in posts:
        async with http.post(f"{controller.url}{path}", data=sender(past)) as r:
            assert r.status == 413, path
            answer = await r.json()
            assert answer["error"] == "payload_too_large"
            assert str(MAX_BODY) in answer["message"]
        async with http.post(f"{controller.url}{path}", data=sender(at_limit)) as r:
            assert r.status in (200, 400), path


async def test_huge_chunked_body_gets_413_and_the_controller_serves_on(
    guarded: tuple[Controller, list[FakeWorker]], http: aiohttp.ClientSession
) -> None:
    """A 64 MiB chunked upload to a 16 KiB limit is answered 413 and the controller serves on."""
    controller, _ = guarded
    body = b"x" * (64 * 1024 * 1024)
    async with http.post(
        f"{controller.url}/worker_generate_stream", data=chunks_of(body, 256 * 1024)
    ) as r:
        assert r.status == 413
    async with http.get(f"{controller.url}/test_connection") as r:
        assert await r.json() == "success"


# -- bodies that break off or do not decode ------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
@pytest.mark.parametrize("really", [True, False], ids=["compressed", "lying"])
async def test_compressed_body_gets_415_unread(
    guarded: tuple[Controller, list[FakeWorker]],
    http: aiohttp.ClientSession,
    encoding: str,
    really: bool,
) -> None:
    """A body with a Content-Encoding other than identity is a 415 naming the header, read
    or not, compressed or lying, and changes nothing."""
    controller, _ = guarded
    before = snapshot(controller)
    plain = json.dumps({"model": "m"}).encode()
    data = gzip.compress(plain) if really and encoding.lower() == "gzip" else plain

    async with http.post(
        f"{controller.url}/get_worker_address",
        data=data,
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
    ) as r:
        status, answer = r.status, await r.json()

    assert status == 415
    assert answer["field"] == "Content-Encoding"
    assert snapshot(controller) == before
    async with http.post(
        f"{controller.url}/get_worker_address",
        data=plain,
        headers={"Content-Encoding": "identity"},
    ) as r:
        assert (await r.json())["address"] != ""


async def test_client_leaving_mid_body_logs_no_error(
    make_worker: MakeWorker, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves halfway through its body is not an error in the controller's log."""
    # Errors from aiohttp reach the capture through the root logger (WARNING and up).
    caplog.set_level(logging.DEBUG, logger="controller")
    # Embedded in an application of our own, whose middleware says when a handler starts.
    entered = asyncio.Event()

    @web.middleware
    async def signal_entry(request: web.Request, handler: Handler) -> web.StreamResponse:
        entered.set()
        return await handler(request)

    app = web.Application(middlewares=[signal_entry])
    await Controller.start(app, ControllerConfig(host="127.0.0.1", port=0))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        for head in (
            b"POST /get_worker_address HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
            b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
        ):
            caplog.clear()
            entered.clear()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            await writer.drain()
            # The handler is waiting for the rest of the body by the time this returns.
            await asyncio.wait_for(entered.wait(), 2)
            writer.close()
            await writer.wait_closed()
            await wait_until(
                lambda: any("left while sending" in r.getMessage() for r in caplog.records)
            )
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        async with http.get(f"http://127.0.0.1:{port}/test_connection") as r:
            assert await r.json() == "success"
    finally:
        await runner.cleanup()
