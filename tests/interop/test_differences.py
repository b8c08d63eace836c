"""What a client sees from each controller where fc-controller deliberately differs, and
where it deliberately does not. Each test pins both controllers' behaviour; the table in
docs/compatibility.md lists them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest

from .support import (
    CONTROLLER_NO_WORKER,
    CONTROLLER_WORKER_TIMEOUT,
    SERVER_ERROR_MSG,
    Launcher,
    consistently,
    eventually,
    free_port,
    list_models,
    post_json,
    stream_messages,
    worker_address,
)


def nobody() -> str:
    """The address of a worker that is not there: nothing listens on it."""
    return f"http://127.0.0.1:{free_port()}"


def registration(
    name: str, models: list[str], *, speed: float = 1, check_heart_beat: bool = True
) -> dict[str, Any]:
    """What a FastChat worker sends to register, status included (so nobody probes it)."""
    return {
        "worker_name": name,
        "check_heart_beat": check_heart_beat,
        "worker_status": {"model_names": models, "speed": speed, "queue_length": 0},
        "multimodal": False,
    }


async def register(http: aiohttp.ClientSession, controller: str, body: dict[str, Any]) -> None:
    status, answer = await post_json(http, f"{controller}/register_worker", body)
    assert (status, answer) == (200, None)


async def test_no_worker_stream(kind: str, launcher: Launcher, http: aiohttp.ClientSession) -> None:
    """No worker for the model: FastChat sends 50005 then a stray 50006; we send 50005 only."""
    controller = launcher.controller(kind)
    raw, messages = await stream_messages(
        http, f"{controller.url}/worker_generate_stream", {"model": "nobody-serves-this"}
    )
    assert raw.endswith(b"\0")
    expected = {
        "fastchat": [CONTROLLER_NO_WORKER, CONTROLLER_WORKER_TIMEOUT],
        "fc": [CONTROLLER_NO_WORKER],
    }[kind]
    assert [m["error_code"] for m in messages] == expected
    assert all(m["text"] == SERVER_ERROR_MSG for m in messages)


async def test_unreachable_worker_stream(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A registered worker that cannot be reached: both send one 50006 message."""
    controller = launcher.controller(kind)
    await register(http, controller.url, registration(nobody(), ["m"], check_heart_beat=False))
    raw, messages = await stream_messages(
        http, f"{controller.url}/worker_generate_stream", {"model": "m", "prompt": "hi"}
    )
    assert raw.endswith(b"\0")
    assert messages == [{"text": SERVER_ERROR_MSG, "error_code": CONTROLLER_WORKER_TIMEOUT}]


async def test_register_without_worker_name(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A registration missing worker_name: FastChat answers 500 in plain text, we 400 in JSON."""
    controller = launcher.controller(kind)
    body = registration("unused", ["m"])
    del body["worker_name"]
    status, answer = await post_json(http, f"{controller.url}/register_worker", body)
    if kind == "fastchat":
        assert status == 500
        assert answer == "Internal Server Error"
    else:
        assert status == 400
        assert answer["error"] == "bad_request"
        assert answer["field"] == "worker_name"
    assert await list_models(http, controller.url) == []


async def test_body_that_is_not_json(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A body that is not JSON: FastChat answers 500, we answer 400 saying so."""
    controller = launcher.controller(kind)
    async with http.post(f"{controller.url}/get_worker_address", data=b"model=m") as r:
        status = r.status
        text = await r.text()
    if kind == "fastchat":
        assert (status, text) == (500, "Internal Server Error")
    else:
        assert status == 400
        assert "JSON" in text


async def test_body_without_content_type(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """Both accept a JSON body sent without a Content-Type header."""
    controller = launcher.controller(kind)
    body = b'{"worker_name": "%s", "check_heart_beat": false, "worker_status": ' % nobody().encode()
    body += b'{"model_names": ["m"], "speed": 1, "queue_length": 0}}'
    async with http.post(
        f"{controller.url}/register_worker", data=body, skip_auto_headers=["Content-Type"]
    ) as r:
        assert r.status == 200
    assert await list_models(http, controller.url) == ["m"]


async def test_worker_with_speed_zero(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A registration claiming speed 0: FastChat takes it and then divides by zero (500);
    we refuse it with a 400 naming the field (issue 15: speed must be above 0)."""
    controller = launcher.controller(kind)
    name = nobody()
    body = registration(name, ["m"], speed=0)
    if kind == "fastchat":
        await register(http, controller.url, body)
        status, answer = await post_json(
            http, f"{controller.url}/get_worker_address", {"model": "m"}
        )
        assert (status, answer) == (500, "Internal Server Error")
    else:
        status, answer = await post_json(http, f"{controller.url}/register_worker", body)
        assert status == 400 and answer["field"] == "worker_status.speed"


async def test_heartbeat_from_unknown_worker(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """Both answer a heartbeat from a worker they do not know with exist: false."""
    controller = launcher.controller(kind)
    status, answer = await post_json(
        http,
        f"{controller.url}/receive_heart_beat",
        {"worker_name": nobody(), "queue_length": 0},
    )
    assert (status, answer) == (200, {"exist": False})


async def test_refresh_drops_workers_that_do_not_answer(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """Both drop, on /refresh_all_workers, a worker that does not answer its status probe."""
    controller = launcher.controller(kind)
    worker = launcher.worker(controller.url)
    await register(http, controller.url, registration(nobody(), ["gone-model"]))
    assert await list_models(http, controller.url) == ["fake-model", "gone-model"]

    status, answer = await post_json(http, f"{controller.url}/refresh_all_workers")

    assert (status, answer) == (200, None)
    assert await list_models(http, controller.url) == ["fake-model"]
    assert await worker_address(http, controller.url, "fake-model") == worker.url


async def test_expiry_timing(kind: str, launcher: Launcher, http: aiohttp.ClientSession) -> None:
    """A silent worker: we stop routing to it at the expiration, FastChat up to twice that."""
    expiration = 3
    controller = launcher.controller(kind, expiration=expiration)
    silent, late = nobody(), nobody()
    await register(http, controller.url, registration(silent, ["silent-model"]))
    await register(http, controller.url, registration(late, ["late-model"]))
    registered = time.monotonic()

    async def silent_listed() -> bool:
        return "silent-model" in await list_models(http, controller.url)

    async def silent_gone() -> bool:
        return not await silent_listed()

    if kind == "fc":
        took = await eventually(silent_gone, expiration + 1.5, "the silent worker is dropped")
        assert time.monotonic() - registered > expiration - 0.5, f"dropped after {took:.1f} s"
    else:
        # FastChat sweeps once per expiration period, from its start: the worker registered
        # just after start survives the first sweep and is still routed to.
        await consistently(silent_listed, expiration + 0.5, "FastChat still lists it")

    # The expiration has passed for the second worker too (waiting is the scenario here).
    await asyncio.sleep(max(0.0, registered + expiration + 0.5 - time.monotonic()))
    status, answer = await post_json(
        http, f"{controller.url}/receive_heart_beat", {"worker_name": late, "queue_length": 0}
    )
    # A heartbeat after expiry: FastChat takes it back if its sweep has not run yet; we
    # answer exist: false, so the worker registers again with its current status.
    assert (status, answer) == (200, {"exist": kind == "fastchat"})

    if kind == "fastchat":
        await eventually(silent_gone, expiration + 1.5, "FastChat's second sweep drops it")
        assert time.monotonic() - registered < 2 * expiration + 1.5


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stop_signal(kind: str, signum: signal.Signals, launcher: Launcher) -> None:
    """SIGINT/SIGTERM: we exit with status 0; FastChat hangs on SIGINT, dies by SIGTERM."""
    controller = launcher.controller(kind)
    controller.service.send_signal(signum)
    status = await asyncio.to_thread(controller.service.wait, 3.0)
    if kind == "fc":
        assert status == 0
    elif signum == signal.SIGINT:
        # Its server stops, but its expiry thread is not a daemon and never ends.
        assert status is None
        assert controller.service.running
    else:
        # uvicorn re-raises SIGTERM after shutting down, and the default action kills it.
        assert status == -signal.SIGTERM
