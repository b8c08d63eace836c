"""Hierarchical mode: a child controller registered with a parent as if it were one worker.

The tree is FastChat-code worker -> child fc-controller -> parent controller (ours, or
FastChat's), with the child registered at the parent by FastChat's ``register_worker``
helper (``check_heart_beat`` false), and FastChat's API server pointed at the parent. The
API server then calls every worker endpoint on the address the parent gives it: the child.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from .support import (
    CONTROLLER_KINDS,
    CONTROLLER_NO_WORKER,
    CONTROLLER_WORKER_TIMEOUT,
    FAKE_CONTEXT_LEN,
    FAKE_REPLY,
    MODEL,
    SERVER_ERROR_MSG,
    ApiServerProc,
    ControllerProc,
    Launcher,
    WorkerProc,
    free_port,
    list_models,
    post_json,
    sse_events,
    stream_messages,
    worker_address,
)

CHAT = [{"role": "user", "content": "Say hello"}]

#: worker endpoints answered with one JSON document, and a request body for each
DOCUMENT_ENDPOINTS: dict[str, dict[str, Any]] = {
    "/worker_generate": {"model": MODEL, "prompt": "Say hello", "max_new_tokens": 4},
    "/worker_get_conv_template": {"model": MODEL},
    "/model_details": {"model": MODEL},
    "/count_token": {"model": MODEL, "prompt": "three little words"},
    "/worker_get_embeddings": {"model": MODEL, "input": ["one two", "three"]},
}


def register_manually(launcher: Launcher, controller: str, worker_name: str) -> None:
    """Register ``worker_name`` at ``controller`` with FastChat's register_worker helper."""
    done = launcher.run_fastchat(
        "fastchat.serve.register_worker",
        "--controller-address",
        controller,
        "--worker-name",
        worker_name,
    )
    assert done.returncode == 0, done.stderr


@attrs.frozen
class Child:
    """A child fc-controller with one FastChat-code worker registered."""

    controller: ControllerProc
    worker: WorkerProc


@attrs.frozen
class Tree:
    parent: ControllerProc
    child: Child
    api: ApiServerProc


@pytest.fixture(scope="module")
def child_launcher(
    fastchat_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    launcher = Launcher(fastchat_python, tmp_path_factory.mktemp("hierarchy"))
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def child(child_launcher: Launcher) -> Child:
    """One child fc-controller and its worker, shared by this module's read-only tests."""
    controller = child_launcher.controller("fc")
    return Child(controller, child_launcher.worker(controller.url))


@pytest.fixture(scope="module", params=CONTROLLER_KINDS)
def tree(request: pytest.FixtureRequest, child_launcher: Launcher, child: Child) -> Tree:
    """The child registered at a parent of each kind, and an API server on the parent."""
    parent = child_launcher.controller(request.param)
    register_manually(child_launcher, parent.url, child.controller.url)
    return Tree(parent, child, child_launcher.api_server(parent.url))


async def test_parent_routes_to_the_child(tree: Tree, http: aiohttp.ClientSession) -> None:
    """The parent lists the child's models and gives out the child's address for them."""
    assert await list_models(http, tree.parent.url) == [MODEL]
    assert await worker_address(http, tree.parent.url, MODEL) == tree.child.controller.url


async def test_models_through_the_tree(tree: Tree, http: aiohttp.ClientSession) -> None:
    """GET /v1/models (a refresh, which probes the child) lists the worker's model."""
    async with http.get(f"{tree.api.url}/v1/models") as r:
        assert r.status == 200
        body = await r.json()
    assert [card["id"] for card in body["data"]] == [MODEL]


async def test_chat_completion_through_the_tree(tree: Tree, http: aiohttp.ClientSession) -> None:
    """A chat completion works through parent, child and worker."""
    status, body = await post_json(
        http, f"{tree.api.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT}
    )
    assert status == 200, body
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": FAKE_REPLY}
    assert body["usage"]["completion_tokens"] == len(FAKE_REPLY.split())


async def test_chat_completion_stream_through_the_tree(
    tree: Tree, http: aiohttp.ClientSession
) -> None:
    """A streamed chat completion works through parent, child and worker."""
    _, payloads = await sse_events(
        http,
        f"{tree.api.url}/v1/chat/completions",
        {"model": MODEL, "messages": CHAT, "stream": True},
    )
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == FAKE_REPLY


async def test_completion_through_the_tree(tree: Tree, http: aiohttp.ClientSession) -> None:
    """A text completion works through parent, child and worker."""
    status, body = await post_json(
        http, f"{tree.api.url}/v1/completions", {"model": MODEL, "prompt": "Once upon a time"}
    )
    assert status == 200, body
    assert body["choices"][0]["text"] == FAKE_REPLY


async def test_embeddings_through_the_tree(tree: Tree, http: aiohttp.ClientSession) -> None:
    """Embeddings work through parent, child and worker."""
    status, body = await post_json(
        http, f"{tree.api.url}/v1/embeddings", {"model": MODEL, "input": ["one two", "three"]}
    )
    assert status == 200, body
    assert [d["embedding"] for d in body["data"]] == [[7.0, 2.0, 0.5, -0.5], [5.0, 1.0, 0.5, -0.5]]
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("path", list(DOCUMENT_ENDPOINTS))
async def test_child_answers_like_its_worker(
    path: str, child: Child, http: aiohttp.ClientSession
) -> None:
    """Each worker endpoint on the child answers what the worker itself answers."""
    body = DOCUMENT_ENDPOINTS[path]
    direct = await post_json(http, f"{child.worker.url}{path}", body)
    relayed = await post_json(http, f"{child.controller.url}{path}", body)
    assert direct[0] == 200
    assert relayed == direct


async def test_child_status_and_stream(child: Child, http: aiohttp.ClientSession) -> None:
    """The child's status sums its workers'; its stream is the worker's, byte for byte."""
    status, answer = await post_json(http, f"{child.controller.url}/worker_get_status")
    assert (status, answer) == (200, {"model_names": [MODEL], "speed": 1, "queue_length": 0})
    _, context = await post_json(http, f"{child.controller.url}/model_details", {"model": MODEL})
    assert context == {"context_length": FAKE_CONTEXT_LEN}

    body = {"model": MODEL, "prompt": "Say hello"}
    direct, _ = await stream_messages(http, f"{child.worker.url}/worker_generate_stream", body)
    relayed, _ = await stream_messages(http, f"{child.controller.url}/worker_generate_stream", body)
    assert relayed == direct


@pytest.mark.parametrize("path", [*DOCUMENT_ENDPOINTS, "/worker_generate_stream"])
async def test_child_errors_are_shaped_like_a_workers(
    path: str, fc_launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """No worker (50005) or a dead one (50006): HTTP 200 and the worker-shaped error."""
    controller = fc_launcher.controller("fc")
    dead = f"http://127.0.0.1:{free_port()}"
    registration = {
        "worker_name": dead,
        "check_heart_beat": False,
        "worker_status": {"model_names": ["dead-model"], "speed": 1, "queue_length": 0},
    }
    await post_json(http, f"{controller.url}/register_worker", registration)

    for model, code in [
        ("no-model", CONTROLLER_NO_WORKER),
        ("dead-model", CONTROLLER_WORKER_TIMEOUT),
    ]:
        body = {**DOCUMENT_ENDPOINTS.get(path, {}), "model": model}
        expected = {"text": SERVER_ERROR_MSG, "error_code": code}
        if path == "/worker_generate_stream":
            raw, messages = await stream_messages(http, f"{controller.url}{path}", body)
            assert raw.endswith(b"\0")
            assert messages == [expected]
        else:
            assert await post_json(http, f"{controller.url}{path}", body) == (200, expected)


async def test_fastchat_child_cannot_serve_the_api_server(
    kind: str, launcher: Launcher, http: aiohttp.ClientSession
) -> None:
    """FastChat's controller as the child: listed at the parent, but the API server fails."""
    parent = launcher.controller(kind)
    child = launcher.controller("fastchat")
    launcher.worker(child.url)
    register_manually(launcher, parent.url, child.url)
    api = launcher.api_server(parent.url)

    async with http.get(f"{api.url}/v1/models") as r:
        assert r.status == 200
        assert [card["id"] for card in (await r.json())["data"]] == [MODEL]

    # The API server asks the child for the conversation template, context length, token
    # count, completion and embeddings: FastChat's controller serves none of them.
    for path, body in DOCUMENT_ENDPOINTS.items():
        status, _ = await post_json(http, f"{child.url}{path}", body)
        assert status == 404, path
    status, body = await post_json(
        http, f"{api.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT}
    )
    assert (status, body) == (500, "Internal Server Error")
