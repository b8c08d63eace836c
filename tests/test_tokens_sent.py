"""The tokens a component sends: a worker's to its controller (and what it does when
refused), a child controller's to its parent, and the upstream token the controller sends
to its workers on every path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig
from controller.cli import load_config
from controller.credentials import Access, TokenTable
from controller.decisions.models import Owner
from controller.worker import HeartbeatClient, HeartbeatConfig, SyncHeartbeatClient
from controller.worker.demo.cli import load_settings
from controller.worker.tokens import read_token_file

from .conftest import RunController, post_ok, register_body, wait_until

WORKER = "worker-token-0123456789abcdef"
UPSTREAM = "upstream-token-0123456789abc"
PARENT = "parent-token-0123456789abcde"


def closed(**kwargs: Any) -> ControllerConfig:
    access = Access(worker_tokens=TokenTable.from_lines([f"gpu:{WORKER}"], "test"))
    return ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, access=access, **kwargs)


def heartbeat_config(controller: Controller, **kwargs: Any) -> HeartbeatConfig:
    settings: dict[str, Any] = {
        "controller_address": controller.url,
        "worker_address": "http://127.0.0.1:9001",
        "model_names": ["m"],
        "interval": 0.2,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
    }
    settings.update(kwargs)
    return HeartbeatConfig(**settings)


# -- a worker and its token --------------------------------------------------------------


async def test_a_worker_with_its_token_registers_with_a_closed_controller(
    run_controller: RunController,
) -> None:
    """HeartbeatConfig(token=...) is sent as a bearer token: the worker registers and the
    registration belongs to the token's principal."""
    controller = await run_controller(closed())
    async with HeartbeatClient(heartbeat_config(controller, token=WORKER)) as client:
        async with asyncio.timeout(5):
            await client.wait_registered()
        worker = controller.registry.get("http://127.0.0.1:9001")
        assert worker is not None and worker.owner == Owner(principal="gpu")
    # The goodbye went through with the token too.
    assert controller.registry.get("http://127.0.0.1:9001") is None


@pytest.mark.parametrize("token", [None, "not-the-worker-token-0123"])
async def test_a_refused_worker_logs_one_error_saying_what_to_fix_and_keeps_retrying(
    run_controller: RunController, caplog: pytest.LogCaptureFixture, token: str | None
) -> None:
    """A 401 or 403 is logged once at ERROR naming what to fix; the client keeps retrying
    with backoff and never raises, and the token is in no log line."""
    controller = await run_controller(closed())
    config = heartbeat_config(controller, token=token)
    with caplog.at_level(logging.DEBUG, logger="controller"):
        async with HeartbeatClient(config) as client:
            async with asyncio.timeout(5):
                stats = await client.wait_until(lambda s: s.failures >= 4)
    assert not stats.registered
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "refused" in message and "HTTP 40" in message
    if token is None:
        assert "FC_CONTROLLER_TOKEN" in message and "--trust-workers-from" in message
    else:
        assert all(token not in r.getMessage() for r in caplog.records)


async def test_the_thread_client_sends_its_token_too(run_controller: RunController) -> None:
    """SyncHeartbeatClient(token=...) registers with a closed controller."""
    controller = await run_controller(closed())
    client = SyncHeartbeatClient(
        heartbeat_config(controller, token=WORKER, unregister_on_close=False)
    )
    client.start()
    try:
        await wait_until(lambda: controller.registry.get("http://127.0.0.1:9001") is not None, 5)
    finally:
        await asyncio.to_thread(client.close)


def test_a_heartbeat_config_never_shows_its_token() -> None:
    """The token is checked (no CR/LF, long enough) and hidden from the repr."""
    config = HeartbeatConfig(
        controller_address="http://c:1",
        worker_address="http://w:2",
        model_names=["m"],
        token=WORKER,
    )
    assert WORKER not in repr(config)
    for bad in ("short", WORKER + "\r\nX-Evil: 1"):
        with pytest.raises(ValueError, match="token"):
            HeartbeatConfig(
                controller_address="http://c:1",
                worker_address="http://w:2",
                model_names=["m"],
                token=bad,
            )


def test_fc_demo_worker_reads_its_token_from_a_file_or_fc_controller_token(
    tmp_path: Path,
) -> None:
    """--controller-token-file PATH wins over FC_CONTROLLER_TOKEN; both reach the settings
    and neither shows in their repr."""
    path = tmp_path / "token"
    path.write_text(f"# for gpu-a\ngpu-a:{WORKER}\n")
    settings, _ = load_settings(["--controller-token-file", str(path)], {})
    assert settings.controller_token == WORKER
    assert WORKER not in repr(settings)
    settings, _ = load_settings([], {"FC_CONTROLLER_TOKEN": UPSTREAM})
    assert settings.controller_token == UPSTREAM
    settings, _ = load_settings(
        ["--controller-token-file", str(path)], {"FC_CONTROLLER_TOKEN": UPSTREAM}
    )
    assert settings.controller_token == WORKER


def test_a_token_file_for_a_sender_holds_exactly_one_token(tmp_path: Path) -> None:
    """A sender's token file with two tokens, or none, is refused."""
    path = tmp_path / "token"
    path.write_text(f"{WORKER}\n{UPSTREAM}\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_token_file(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_token_file(str(path))


# -- the controller's own tokens ---------------------------------------------------------


def test_upstream_and_parent_tokens_come_from_files_or_the_issue_s_variables(
    tmp_path: Path,
) -> None:
    """--upstream-token-file / FC_CONTROLLER_UPSTREAM_TOKEN and --parent-token-file /
    FC_PARENT_CONTROLLER_TOKEN; the flag wins."""
    environ = {"FC_CONTROLLER_UPSTREAM_TOKEN": UPSTREAM, "FC_PARENT_CONTROLLER_TOKEN": PARENT}
    config, _ = load_config([], environ)
    assert (config.upstream_token, config.parent_token) == (UPSTREAM, PARENT)
    path = tmp_path / "t"
    path.write_text(WORKER)
    config, _ = load_config(
        ["--upstream-token-file", str(path), "--parent-token-file", str(path)], environ
    )
    assert (config.upstream_token, config.parent_token) == (WORKER, WORKER)


@contextlib.asynccontextmanager
async def recording_worker(seen: list[tuple[str, str | None]]) -> AsyncIterator[str]:
    """A worker (or a parent) that records the Authorization header of every request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Authorization")))
        await request.read()
        if request.path == "/worker_generate_stream":
            return web.Response(body=b'{"text": "hi", "error_code": 0}\0')
        if request.path == "/worker_get_status":
            return web.json_response({"model_names": ["m"], "speed": 1, "queue_length": 0})
        if request.path == "/receive_heart_beat":
            return web.json_response({"exist": True})
        if request.path == "/unregister_worker":
            return web.json_response({"removed": True})
        return web.json_response(None if request.path == "/register_worker" else {"ok": 1})

    app = web.Application()
    app.router.add_post("/{path:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_the_upstream_token_goes_with_every_request_to_a_worker(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Status probes, the relay's own stream connections and single-document calls all
    carry the upstream token."""
    seen: list[tuple[str, str | None]] = []
    async with recording_worker(seen) as url:
        config = ControllerConfig(
            host="127.0.0.1", port=0, load_poll_interval=0, upstream_token=UPSTREAM
        )
        controller = await run_controller(config)
        await post_ok(http, controller, "/register_worker", register_body(url))  # a probe
        async with http.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
            assert b"hi" in await r.read()
        await post_ok(http, controller, "/model_details", {"model": "m"})
        await post_ok(http, controller, "/refresh_all_workers")
    paths = {path for path, _ in seen}
    assert {"/worker_get_status", "/worker_generate_stream", "/model_details"} <= paths
    assert {auth for _, auth in seen} == {f"Bearer {UPSTREAM}"}


async def test_the_parent_gets_the_parent_token_and_never_the_upstream_token(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """A child controller registers, heartbeats and says goodbye to its parent with the
    parent token; the upstream token stays with the workers."""
    seen: list[tuple[str, str | None]] = []
    async with recording_worker(seen) as parent:
        config = ControllerConfig(
            host="127.0.0.1",
            port=0,
            load_poll_interval=0,
            parent_controller=parent,
            parent_heart_beat_interval=0.05,
            upstream_token=UPSTREAM,
            parent_token=PARENT,
        )
        child = await run_controller(config)
        status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
        body = register_body("http://127.0.0.1:9", worker_status=status)
        await post_ok(http, child, "/register_worker", body)
        await wait_until(lambda: any(p == "/receive_heart_beat" for p, _ in seen), 5)
        await child.aclose()
    assert "/unregister_worker" in {p for p, _ in seen}
    assert {auth for _, auth in seen} == {f"Bearer {PARENT}"}
