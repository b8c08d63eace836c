"""TinyChat's side of the protocol (mit-han-lab/llm-awq), against our controller's profiles.

TinyChat is not installed: its workers' requests are small, so the tests send them as its
worker does (a registration without ``multimodal``, heartbeats) and read the streams as its
clients do.
"""

from __future__ import annotations

import aiohttp
import pytest

from .support import (
    CONTROLLER_NO_WORKER,
    CONTROLLER_WORKER_TIMEOUT,
    FAKE_REPLY,
    MODEL,
    SERVER_ERROR_MSG,
    Launcher,
    free_port,
    list_models,
    post_json,
    stream_messages,
    worker_address,
)

PROFILES = ["fastchat", "tinychat"]
#: (no worker, worker failed) stream error codes per profile
ERROR_CODES = {
    "fastchat": (CONTROLLER_NO_WORKER, CONTROLLER_WORKER_TIMEOUT),
    "tinychat": (2, 3),
}


def tinychat_registration(name: str, models: list[str]) -> dict[str, object]:
    """What TinyChat's model worker sends to register: no ``multimodal`` key."""
    return {
        "worker_name": name,
        "check_heart_beat": True,
        "worker_status": {"model_names": models, "speed": 1, "queue_length": 0},
    }


@pytest.mark.parametrize("profile", PROFILES)
async def test_tinychat_worker_registers(
    profile: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """A TinyChat-style registration works in either profile; so do heartbeats and streams."""
    controller = launcher.controller("fc", args=["--profile", profile])
    worker = launcher.worker(controller.url, register=False)

    status, answer = await post_json(
        http, f"{controller.url}/register_worker", tinychat_registration(worker.url, [MODEL])
    )

    assert (status, answer) == (200, None)
    assert await list_models(http, controller.url) == [MODEL]
    _, language = await post_json(http, f"{controller.url}/list_language_models")
    assert language == {"models": [MODEL]}
    assert await worker_address(http, controller.url, MODEL) == worker.url
    status, answer = await post_json(
        http,
        f"{controller.url}/receive_heart_beat",
        {"worker_name": worker.url, "queue_length": 0},
    )
    assert (status, answer) == (200, {"exist": True})
    _, messages = await stream_messages(
        http, f"{controller.url}/worker_generate_stream", {"model": MODEL, "prompt": "hi"}
    )
    assert messages[-1]["text"] == FAKE_REPLY


@pytest.mark.parametrize("profile", PROFILES)
async def test_stream_error_codes(
    profile: str, fc_launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """Stream errors carry 2 (no worker) and 3 (worker failed) with the TinyChat profile."""
    no_worker, worker_failed = ERROR_CODES[profile]
    controller = fc_launcher.controller("fc", args=["--profile", profile])
    dead = f"http://127.0.0.1:{free_port()}"
    await post_json(http, f"{controller.url}/register_worker", tinychat_registration(dead, ["m"]))
    url = f"{controller.url}/worker_generate_stream"

    _, messages = await stream_messages(http, url, {"model": "nobody-serves-this"})
    assert messages == [{"text": SERVER_ERROR_MSG, "error_code": no_worker}]

    _, messages = await stream_messages(http, url, {"model": "m", "prompt": "hi"})
    assert messages == [{"text": SERVER_ERROR_MSG, "error_code": worker_failed}]


@pytest.mark.parametrize(("profile", "seconds"), [("fastchat", 90), ("tinychat", 30)])
async def test_default_expiration(profile: str, seconds: int, fc_launcher: Launcher) -> None:
    """The default heartbeat expiration is TinyChat's 30 s with its profile, else 90 s."""
    controller = fc_launcher.controller("fc", args=["--profile", profile])
    assert f"heartbeat expiration {seconds} s" in controller.service.output()
