"""Every endpoint of PROTOCOL.md, wire-identical to FastChat 0.2.36 where FastChat is right."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig, ErrorProfile

from .conftest import SERVER_ERROR_MSG, MakeWorker, RunController, register_body, split_stream

POST_PATHS = [
    "/register_worker",
    "/unregister_worker",
    "/refresh_all_workers",
    "/list_models",
    "/list_multimodal_models",
    "/list_language_models",
    "/get_worker_address",
    "/receive_heart_beat",
    "/worker_generate_stream",
    "/worker_get_status",
]


def fastchat_error(code: int) -> bytes:
    """An in-band error message exactly as FastChat's controller builds it."""
    return json.dumps({"text": SERVER_ERROR_MSG, "error_code": code}).encode() + b"\0"


@pytest.fixture
async def controller(run_controller: RunController) -> Controller:
    return await run_controller(ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0))


async def post(
    http: aiohttp.ClientSession, controller: Controller, path: str, body: Any = None
) -> tuple[int, str, bytes]:
    """POST ``body`` as JSON (no body when None); status, content type and raw answer."""
    async with http.post(f"{controller.url}{path}", json=body) as r:
        return r.status, r.content_type, await r.read()


async def register(http: aiohttp.ClientSession, controller: Controller, body: Any) -> None:
    status, _, raw = await post(http, controller, "/register_worker", body)
    assert (status, raw) == (200, b"null")


async def test_test_connection_answers_the_json_string_success(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """GET /test_connection answers the JSON string "success"."""
    async with http.get(f"{controller.url}/test_connection") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.read() == b'"success"'


async def test_register_worker_answers_json_null_and_makes_the_model_routable(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/register_worker with a status answers JSON null and the worker's models are listed."""
    worker = await make_worker(model_names=["vicuna", "llama"])
    status, content_type, raw = await post(
        http, controller, "/register_worker", register_body(worker)
    )
    assert (status, content_type, raw) == (200, "application/json", b"null")
    _, _, listed = await post(http, controller, "/list_models")
    assert json.loads(listed) == {"models": ["llama", "vicuna"]}
    assert worker.status_calls == 0


async def test_endpoints_accept_json_bodies_without_content_type(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """Bodies sent with no Content-Type header are read as JSON, as FastChat does."""
    worker = await make_worker(tokens=2)

    async def bare(path: str, body: Any) -> bytes:
        async with http.post(
            f"{controller.url}{path}",
            data=json.dumps(body).encode(),
            skip_auto_headers=["Content-Type"],
        ) as r:
            assert "Content-Type" not in r.request_info.headers
            assert r.status == 200, await r.text()
            return await r.read()

    assert await bare("/register_worker", register_body(worker)) == b"null"
    assert json.loads(await bare("/get_worker_address", {"model": "m"})) == {"address": worker.url}
    beat = {"worker_name": worker.url, "queue_length": 0}
    assert json.loads(await bare("/receive_heart_beat", beat)) == {"exist": True}
    raw = await bare("/worker_generate_stream", {"model": "m"})
    assert [m["text"] for m in split_stream(raw)] == ["tok0", "tok0 tok1"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/refresh_all_workers", None),
        ("/list_models", {"models": []}),
        ("/list_multimodal_models", {"models": []}),
        ("/list_language_models", {"models": []}),
        ("/worker_get_status", {"model_names": [], "speed": 0, "queue_length": 0}),
    ],
)
async def test_bodiless_endpoints_accept_an_empty_body(
    controller: Controller, http: aiohttp.ClientSession, path: str, expected: Any
) -> None:
    """Endpoints that take no input answer an empty, untyped POST with their JSON shape."""
    async with http.post(f"{controller.url}{path}", skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert json.loads(await r.read()) == expected


async def test_list_models_is_the_union_over_workers(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/list_models lists each model of every registered worker once."""
    a = await make_worker(model_names=["a", "shared"])
    b = await make_worker(model_names=["shared", "b"])
    await register(http, controller, register_body(a))
    await register(http, controller, register_body(b))
    _, _, raw = await post(http, controller, "/list_models")
    models = json.loads(raw)["models"]
    assert sorted(models) == ["a", "b", "shared"]
    assert len(models) == 3


async def test_model_lists_filter_on_the_multimodal_flag(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """Multimodal and language lists split workers by their flag; no flag means language."""
    vision = await make_worker(model_names=["llava"])
    text = await make_worker(model_names=["vicuna"])
    explicit = await make_worker(model_names=["mistral"])
    await register(http, controller, register_body(vision, multimodal=True))
    # TinyChat workers send no multimodal key at all.
    await register(http, controller, register_body(text))
    await register(http, controller, register_body(explicit, multimodal=False))

    async def models(path: str) -> list[str]:
        _, _, raw = await post(http, controller, path)
        return sorted(json.loads(raw)["models"])

    assert await models("/list_multimodal_models") == ["llava"]
    assert await models("/list_language_models") == ["mistral", "vicuna"]
    assert await models("/list_models") == ["llava", "mistral", "vicuna"]


async def test_get_worker_address_names_the_worker_or_is_empty(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/get_worker_address answers the serving worker's name, or "" for an unknown model."""
    worker = await make_worker(model_names=["m"])
    await register(http, controller, register_body(worker))
    _, _, known = await post(http, controller, "/get_worker_address", {"model": "m"})
    _, _, unknown = await post(http, controller, "/get_worker_address", {"model": "nope"})
    assert known == json.dumps({"address": worker.url}).encode()
    assert unknown == b'{"address": ""}'


async def test_receive_heart_beat_says_whether_the_worker_exists(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/receive_heart_beat answers {"exist": true} for a registered worker, false otherwise."""
    worker = await make_worker()
    await register(http, controller, register_body(worker))
    _, _, known = await post(
        http, controller, "/receive_heart_beat", {"worker_name": worker.url, "queue_length": 0}
    )
    _, _, unknown = await post(
        http,
        controller,
        "/receive_heart_beat",
        {"worker_name": "http://127.0.0.1:1", "queue_length": 0},
    )
    assert json.loads(known) == {"exist": True}
    assert json.loads(unknown) == {"exist": False}


async def test_stream_relays_worker_messages_byte_for_byte_with_nul_after_each(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/worker_generate_stream answers 200 with the worker's messages, each ending in NUL."""
    worker = await make_worker(tokens=3)
    await register(http, controller, register_body(worker))
    async with http.post(
        f"{controller.url}/worker_generate_stream", json={"model": "m", "prompt": "hi"}
    ) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw == b"".join(worker.message(i) for i in range(3))
    assert raw.count(b"\0") == 3
    assert raw.endswith(b"\0")


async def test_stream_for_unknown_model_is_one_50005_message(
    controller: Controller, http: aiohttp.ClientSession
) -> None:
    """No worker for the model: a single 50005 message (no second 50006, unlike FastChat)."""
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "x"}) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw == fastchat_error(50005)
    assert split_stream(raw) == [{"text": SERVER_ERROR_MSG, "error_code": 50005}]


async def test_tinychat_profile_uses_codes_2_and_3(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """With the TinyChat error profile, no worker is code 2 and a failed worker code 3."""
    config = ControllerConfig(
        host="127.0.0.1", port=0, load_poll_interval=0, error_profile=ErrorProfile.tinychat()
    )
    controller = await run_controller(config)
    worker = await make_worker(stream_status=500)
    await register(http, controller, register_body(worker))
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "x"}) as r:
        assert await r.read() == fastchat_error(2)
    async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert await r.read() == fastchat_error(3)


async def test_worker_get_status_sums_what_workers_say_now(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/worker_get_status asks every worker and sums speed and queue over sorted model names."""
    a = await make_worker(model_names=["zeta", "alpha"], speed=1, queue_length=0)
    b = await make_worker(model_names=["beta", "alpha"], speed=2.5, queue_length=0)
    await register(http, controller, register_body(a))
    await register(http, controller, register_body(b))
    # What the workers report now, not what they said when registering.
    a.queue_length, b.queue_length = 3, 4
    _, _, raw = await post(http, controller, "/worker_get_status")
    assert json.loads(raw) == {
        "model_names": ["alpha", "beta", "zeta"],
        "speed": 3.5,
        "queue_length": 7,
    }
    assert (a.status_calls, b.status_calls) == (1, 1)


async def test_refresh_all_workers_drops_dead_and_refreshes_live_queues(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/refresh_all_workers answers null, forgets workers that fail, updates the others."""
    dead = await make_worker(model_names=["gone"])
    busy = await make_worker(model_names=["m"])
    idle = await make_worker(model_names=["m"])
    for worker in (dead, busy, idle):
        await register(http, controller, register_body(worker))
    dead_url = dead.url
    await dead.stop()
    busy.queue_length = 5

    status, content_type, raw = await post(http, controller, "/refresh_all_workers")

    assert (status, content_type, raw) == (200, "application/json", b"null")
    _, _, listed = await post(http, controller, "/list_models")
    assert json.loads(listed) == {"models": ["m"]}
    assert controller.registry.get(dead_url) is None
    info = controller.registry.get(busy.url)
    assert info is not None
    assert info.queue_length == 5
    # busy registered first, so only its fresh queue length sends the request to idle.
    _, _, address = await post(http, controller, "/get_worker_address", {"model": "m"})
    assert json.loads(address) == {"address": idle.url}


async def test_unregister_worker_makes_it_unroutable_at_once(
    controller: Controller, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """/unregister_worker answers {"removed": true} once, then false; the worker is gone."""
    worker = await make_worker(model_names=["m"])
    await register(http, controller, register_body(worker))
    body = {"worker_name": worker.url}
    status, content_type, first = await post(http, controller, "/unregister_worker", body)
    assert (status, content_type) == (200, "application/json")
    assert json.loads(first) == {"removed": True}
    _, _, address = await post(http, controller, "/get_worker_address", {"model": "m"})
    assert json.loads(address) == {"address": ""}
    _, _, listed = await post(http, controller, "/list_models")
    assert json.loads(listed) == {"models": []}
    _, _, second = await post(http, controller, "/unregister_worker", body)
    assert json.loads(second) == {"removed": False}


@pytest.mark.parametrize("path", POST_PATHS)
async def test_get_on_a_post_endpoint_is_405(
    controller: Controller, http: aiohttp.ClientSession, path: str
) -> None:
    """Each POST endpoint answers GET with 405 Method Not Allowed."""
    async with http.get(f"{controller.url}{path}") as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_other_methods_on_test_connection_are_405(
    controller: Controller, http: aiohttp.ClientSession, method: str
) -> None:
    """/test_connection takes GET only; any other method is 405."""
    async with http.request(method, f"{controller.url}/test_connection") as r:
        assert r.status == 405


@pytest.mark.parametrize("path", ["/nope", "/list_models/extra", "/register_worker2", "/"])
async def test_unknown_path_is_404(
    controller: Controller, http: aiohttp.ClientSession, path: str
) -> None:
    """A path that is not an endpoint answers 404."""
    async with http.post(f"{controller.url}{path}", json={}) as r:
        assert r.status == 404
