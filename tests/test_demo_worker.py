"""The demo worker end to end: real servers on loopback ports, real HTTP, real controller."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig
from controller.worker import ENV_HEART_BEAT_INTERVAL
from controller.worker.demo import SERVER_ERROR_MSG, DemoSettings, DemoWorker, load_settings, main

TIMEOUT = 5.0
ROOT = Path(__file__).parent.parent

MakeDemo = Callable[..., Awaitable[DemoWorker]]


@pytest.fixture
async def make_demo() -> AsyncIterator[MakeDemo]:
    """Factory for demo workers on free loopback ports, not registering unless told."""
    workers: list[DemoWorker] = []

    async def make(**settings: Any) -> DemoWorker:
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "register": False,
            "token_delay": 0.0,
            "shutdown_timeout": 0.5,
        }
        worker = DemoWorker(DemoSettings(**{**base, **settings}))
        workers.append(worker)
        await worker.start()
        return worker

    yield make
    for worker in workers:
        await worker.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    async with Controller.serve(ControllerConfig(host="127.0.0.1", port=0)) as controller:
        yield controller


def messages(raw: bytes) -> list[dict[str, Any]]:
    """Split a NUL-framed stream the way FastChat's clients do."""
    return [json.loads(piece) for piece in raw.split(b"\0") if piece]


async def post(http: aiohttp.ClientSession, url: str, body: Any = None) -> Any:
    async with http.post(url, json=body) as response:
        assert response.status == 200
        return await response.json()


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with http.post(f"{url}/worker_generate_stream", json=body) as response:
        assert response.status == 200
        return await response.read()


async def eventually(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``predicate()`` holds, checking every few milliseconds, or fail."""
    async with asyncio.timeout(TIMEOUT):
        # Polled over HTTP: a worker's status has no event to wait on.
        while not await predicate():
            await asyncio.sleep(0.01)


# -- the stream ----------------------------------------------------------------------------


async def test_stream_frames_each_message_with_a_nul(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """Cumulative text, NUL after every message, finish_reason and usage on the last."""
    worker = await make_demo()
    raw = await stream(http, worker.url, {"prompt": "Hello there world", "max_new_tokens": 5})
    assert raw.endswith(b"\0")
    assert raw.count(b"\0") == 5
    result = messages(raw)
    texts = [m["text"] for m in result]
    assert texts[0].startswith("Hello there world ")
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before) and len(after) > len(before)
    assert len(texts[-1].split()) == 3 + 5
    assert all(m["error_code"] == 0 for m in result)
    assert [m["finish_reason"] for m in result] == [None] * 4 + ["length"]
    assert result[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_stream_sends_each_token_as_it_is_made(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """The first message arrives while the rest are still being generated."""
    worker = await make_demo(token_delay=0.02)
    body = {"prompt": "Hi", "max_new_tokens": 10}
    async with http.post(f"{worker.url}/worker_generate_stream", json=body) as response:
        first = await response.content.readuntil(b"\0")
        assert json.loads(first[:-1])["usage"]["completion_tokens"] == 1
        assert not response.content.at_eof()
        rest = await response.read()
    assert messages(rest)[-1]["usage"]["completion_tokens"] == 10


async def test_stream_interval_groups_tokens(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """With a stream interval of 3, a message goes out every third token, plus the last."""
    worker = await make_demo(stream_interval=3)
    result = messages(await stream(http, worker.url, {"prompt": "x", "max_new_tokens": 7}))
    assert [m["usage"]["completion_tokens"] for m in result] == [3, 6, 7]


async def test_max_new_tokens_is_capped_and_defaulted(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """A request gets at most the configured limit, and FastChat's 256 when it says nothing."""
    worker = await make_demo(max_new_tokens_limit=10)
    capped = messages(await stream(http, worker.url, {"prompt": "x", "max_new_tokens": 50}))
    assert capped[-1]["usage"]["completion_tokens"] == 10
    worker = await make_demo()
    default = messages(await stream(http, worker.url, {"prompt": "x"}))
    assert default[-1]["usage"]["completion_tokens"] == 256
    none = messages(await stream(http, worker.url, {"prompt": "x", "max_new_tokens": 0}))
    assert none == [
        {
            "text": "x",
            "error_code": 0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]


async def test_echo_and_stop_strings(make_demo: MakeDemo, http: aiohttp.ClientSession) -> None:
    """echo: false leaves the prompt out; a stop string ends the text with finish 'stop'."""
    worker = await make_demo()
    body: dict[str, Any] = {"prompt": "Tell me", "max_new_tokens": 8, "echo": False}
    full = messages(await stream(http, worker.url, body))[-1]["text"]
    assert not full.startswith("Tell me")
    words = full.split()
    stopped = messages(await stream(http, worker.url, {**body, "stop": [words[3]]}))
    assert stopped[-1]["finish_reason"] == "stop"
    assert stopped[-1]["text"] == " ".join(words[:3])
    assert full == messages(await stream(http, worker.url, body))[-1]["text"]  # deterministic


async def test_generate_answers_the_final_message(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """/worker_generate answers the stream's last message as one JSON object."""
    worker = await make_demo()
    body = {"prompt": "Hello", "max_new_tokens": 4}
    last = messages(await stream(http, worker.url, body))[-1]
    assert await post(http, f"{worker.url}/worker_generate", body) == last


# -- the rest of the worker API ------------------------------------------------------------


async def test_status_template_details_and_token_count(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """The small endpoints answer in FastChat's shapes."""
    worker = await make_demo(model_names=("a", "b"), context_length=2048)
    assert await post(http, f"{worker.url}/worker_get_status") == {
        "model_names": ["a", "b"],
        "speed": 1,
        "queue_length": 0,
    }
    conv = (await post(http, f"{worker.url}/worker_get_conv_template", {"model": "a"}))["conv"]
    # What FastChat's OpenAI-compatible API server reads back into a Conversation.
    for key in ("name", "system_template", "system_message", "roles", "messages", "offset"):
        assert key in conv
    for key in ("sep_style", "sep", "sep2", "stop_str", "stop_token_ids", "template_name"):
        assert key in conv
    assert isinstance(conv["sep_style"], int)
    assert await post(http, f"{worker.url}/model_details", {"model": "a"}) == {
        "context_length": 2048
    }
    count = await post(http, f"{worker.url}/count_token", {"prompt": "one two  three\nfour"})
    assert count == {"count": 4, "error_code": 0}


async def test_embeddings_are_deterministic_unit_vectors(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """Embeddings depend only on the text, have unit length, and come as floats or base64."""
    worker = await make_demo(embedding_dim=8)
    url = f"{worker.url}/worker_get_embeddings"
    answer = await post(http, url, {"input": ["a b c", "d", "a b c"]})
    first, second, again = answer["embedding"]
    assert answer["token_num"] == 7
    assert first == again and first != second
    assert len(first) == 8
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, rel_tol=1e-9)
    encoded = await post(http, url, {"input": ["a b c"], "encoding_format": "base64"})
    decoded = struct.unpack("<8f", base64.b64decode(encoded["embedding"][0]))
    assert all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(decoded, first, strict=True)
    )


# -- concurrency and misbehaviour ----------------------------------------------------------


async def test_concurrency_limit_shows_in_queue_length(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """Past the limit requests wait; queue_length counts running plus waiting."""
    worker = await make_demo(limit_worker_concurrency=2)
    body = {"prompt": "x", "max_new_tokens": 5, "demo_hang_after": 0}

    async def request() -> None:
        async with http.post(f"{worker.url}/worker_generate_stream", json=body) as response:
            await response.read()

    async def queue_length_is(n: int) -> bool:
        status = await post(http, f"{worker.url}/worker_get_status")
        return bool(status["queue_length"] == n)

    tasks = [asyncio.create_task(request()) for _ in range(4)]
    await eventually(lambda: queue_length_is(4))
    assert (worker.limiter.running, worker.limiter.waiting) == (2, 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Clients that leave end their generations and free their slots.
    await eventually(lambda: queue_length_is(0))


async def test_hang_after_keeps_the_connection_open_and_silent(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """--hang-after N: N messages, then silence on a connection that stays open."""
    worker = await make_demo(hang_after=2)
    body = {"prompt": "x", "max_new_tokens": 5}
    async with http.post(f"{worker.url}/worker_generate_stream", json=body) as response:
        for expected in (1, 2):
            chunk = await response.content.readuntil(b"\0")
            assert json.loads(chunk[:-1])["usage"]["completion_tokens"] == expected
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.content.readuntil(b"\0"), 0.3)
        assert not response.content.at_eof()


async def test_fail_after_drops_the_connection_mid_stream(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """--fail-after N: N messages, then the connection is cut."""
    worker = await make_demo(fail_after=2)
    body = {"prompt": "x", "max_new_tokens": 5}
    received: list[bytes] = []

    async def read_until_cut() -> None:
        async with http.post(f"{worker.url}/worker_generate_stream", json=body) as response:
            while True:
                received.append(await response.content.readuntil(b"\0"))

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_until_cut()
    assert len(received) == 2
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, f"{worker.url}/worker_generate", body)
    assert worker.limiter.queue_length == 0


async def test_injected_errors_travel_in_band(
    make_demo: MakeDemo, http: aiohttp.ClientSession
) -> None:
    """--error-rate 1 and demo_error answer HTTP 200 with FastChat's error message."""
    always = await make_demo(error_rate=1.0)
    result = messages(await stream(http, always.url, {"prompt": "x"}))
    assert len(result) == 1
    assert result[0]["error_code"] == 50001
    assert result[0]["text"].startswith(SERVER_ERROR_MSG)
    never = await make_demo()
    answer = await post(http, f"{never.url}/worker_generate", {"prompt": "x", "demo_error": True})
    assert answer["error_code"] == 50001


@pytest.mark.parametrize(
    ("body", "code"),
    [({}, 40001), ({"prompt": "x", "max_new_tokens": -1}, 40302), ({"prompt": 5}, 40001)],
)
async def test_bad_generation_requests_get_in_band_errors(
    make_demo: MakeDemo, http: aiohttp.ClientSession, body: dict[str, Any], code: int
) -> None:
    """A bad generation request gets HTTP 200 and one error message, like a real worker."""
    worker = await make_demo()
    assert [m["error_code"] for m in messages(await stream(http, worker.url, body))] == [code]


async def test_per_request_overrides(make_demo: MakeDemo, http: aiohttp.ClientSession) -> None:
    """demo_fail_after in a request overrides the worker's settings for that request only."""
    worker = await make_demo()
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream(http, worker.url, {"prompt": "x", "max_new_tokens": 4, "demo_fail_after": 1})
    result = messages(await stream(http, worker.url, {"prompt": "x", "max_new_tokens": 4}))
    assert result[-1]["finish_reason"] == "length"


# -- with the real controller --------------------------------------------------------------


async def worker_address(http: aiohttp.ClientSession, controller: Controller) -> str:
    answer = await post(http, f"{controller.url}/get_worker_address", {"model": "demo-model"})
    address: str = answer["address"]
    return address


async def test_registers_streams_through_the_controller_and_leaves(
    make_demo: MakeDemo, http: aiohttp.ClientSession, controller: Controller
) -> None:
    """The demo worker registers, serves a stream relayed by the controller, and on close
    is unroutable at once."""
    worker = await make_demo(
        register=True, controller_address=controller.url, heart_beat_interval=0.2
    )
    assert worker.heartbeat is not None
    await asyncio.wait_for(worker.heartbeat.wait_registered(), TIMEOUT)
    assert worker.worker_address == worker.url
    assert await worker_address(http, controller) == worker.url
    raw = await stream(
        http, controller.url, {"model": "demo-model", "prompt": "Hello", "max_new_tokens": 6}
    )
    assert raw.endswith(b"\0")
    assert [m["usage"]["completion_tokens"] for m in messages(raw)] == [1, 2, 3, 4, 5, 6]
    await worker.aclose()
    assert await worker_address(http, controller) == ""


async def test_heartbeats_carry_the_live_queue_length(
    make_demo: MakeDemo, http: aiohttp.ClientSession, controller: Controller
) -> None:
    """Requests held by the worker show up in the queue length its heartbeats report."""
    worker = await make_demo(
        register=True, controller_address=controller.url, heart_beat_interval=0.1
    )
    assert worker.heartbeat is not None
    body = {"prompt": "x", "demo_hang_after": 0}

    async def request() -> None:
        async with http.post(f"{worker.url}/worker_generate_stream", json=body) as response:
            await response.read()

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    try:
        async with asyncio.timeout(TIMEOUT):
            await worker.heartbeat.wait_until(lambda s: s.heartbeats > 0 and s.queue_length == 3)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the command line ----------------------------------------------------------------------


def test_settings_from_flags_and_environment() -> None:
    """Flags map onto settings; the heartbeat interval comes from the environment."""
    settings, level = load_settings(
        ["--port", "21005", "--model-names", "a, b", "--no-register", "--hang-after", "3"],
        {ENV_HEART_BEAT_INTERVAL: "12"},
    )
    assert settings.port == 21005
    assert settings.model_names == ("a", "b")
    assert not settings.register
    assert settings.hang_after == 3
    assert settings.heart_beat_interval == 12
    assert settings.limit_worker_concurrency == 5
    assert level == "info"


def test_bad_environment_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unusable FASTCHAT_WORKER_HEART_BEAT_INTERVAL stops start-up with its name."""
    with pytest.raises(SystemExit) as exit_info:
        load_settings([], {ENV_HEART_BEAT_INTERVAL: "often"})
    assert exit_info.value.code == 2
    assert ENV_HEART_BEAT_INTERVAL in capsys.readouterr().err


def test_port_in_use_exits_with_status_1() -> None:
    """A port that is taken is reported and gives exit status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--host", "127.0.0.1", "--port", str(port), "--no-register"], {}) == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_unregisters_and_exits_0(
    http: aiohttp.ClientSession, controller: Controller, signum: int
) -> None:
    """fc-demo-worker prints its URL, registers, and on SIGINT/SIGTERM leaves and exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.worker.demo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--controller-address",
        controller.url,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, ENV_HEART_BEAT_INTERVAL: "0.2"},
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(TIMEOUT * 2):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the demo worker exited before its startup line"
                if "fc-demo-worker running on" in line:
                    break
        url = line.split("running on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")

        async def registered() -> bool:
            return await worker_address(http, controller) == url

        await eventually(registered)
        process.send_signal(signum)
        async with asyncio.timeout(TIMEOUT):
            rest = await process.stderr.read()
            assert await process.wait() == 0
        assert b"leaving" in rest
        assert await worker_address(http, controller) == ""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_old_module_path_still_works() -> None:
    """``controller.demo_worker`` still gives the demo's names and runs with ``python -m``."""
    from controller import demo_worker

    assert (demo_worker.DemoWorker, demo_worker.load_settings, demo_worker.main) == (
        DemoWorker,
        load_settings,
        main,
    )
    result = subprocess.run(
        [sys.executable, "-m", "controller.demo_worker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: fc-demo-worker")
