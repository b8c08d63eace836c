"""Fixtures for the interoperability tests: FastChat 0.2.36 in its own environment, and
factories for the processes the tests run against each other.

The FastChat environment is built once (see ``support.ensure_fastchat_venv``) and reused.
When it cannot be built, typically for want of a package index, every test here is skipped
with the reason; set ``FC_INTEROP_REQUIRED=1`` to make that a failure instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import attrs
import pytest

from .support import (
    CONTROLLER_KINDS,
    REPO_ROOT,
    ApiServerProc,
    ControllerProc,
    FastChatUnavailable,
    Launcher,
    WorkerProc,
    clean_environ,
    ensure_fastchat_venv,
)


@pytest.fixture(scope="session")
def fastchat_python() -> Path:
    """The interpreter of a virtual environment holding FastChat 0.2.36."""
    try:
        return ensure_fastchat_venv()
    except FastChatUnavailable as e:
        message = f"FastChat 0.2.36 could not be installed for the interop tests: {e}"
        if os.environ.get("FC_INTEROP_REQUIRED", "") not in ("", "0"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def launcher(fastchat_python: Path, tmp_path: Path) -> Iterator[Launcher]:
    """Starts processes for one test and stops them all when it ends."""
    launcher = Launcher(fastchat_python, tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def fc_launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts only fc-controllers (so its tests need no FastChat); stops them at the end."""
    launcher = Launcher(None, tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(params=CONTROLLER_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Which controller a test runs against: "fc" (ours) or "fastchat" (FastChat's)."""
    kind: str = request.param
    return kind


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that opens a connection per request.

    FastChat's servers (uvicorn) close a connection after answering 500 without saying so,
    which would break the next request on a kept-alive connection.
    """
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


@attrs.frozen
class Stack:
    """A controller with one FastChat-code worker registered and an API server using it."""

    controller: ControllerProc
    worker: WorkerProc
    api: ApiServerProc


@pytest.fixture(scope="module", params=CONTROLLER_KINDS)
def stack(
    request: pytest.FixtureRequest,
    fastchat_python: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """One stack per controller kind, shared by a module's tests that only read from it."""
    kind: str = request.param
    launcher = Launcher(fastchat_python, tmp_path_factory.mktemp(f"stack-{kind}"))
    try:
        controller = launcher.controller(kind)
        worker = launcher.worker(controller.url)
        api = launcher.api_server(controller.url)
        yield Stack(controller, worker, api)
    finally:
        launcher.close()


@pytest.fixture(scope="session")
def parent_mode_available() -> bool:
    """Whether this checkout's ``fc-controller`` can register itself with a parent."""
    done = subprocess.run(
        [sys.executable, "-m", "controller", "--help"],
        cwd=REPO_ROOT,
        env=clean_environ({"PYTHONPATH": str(REPO_ROOT)}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--parent-controller" in done.stdout
