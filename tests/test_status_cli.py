"""``fc-controller status`` as a user runs it (a process of its own): the table of a live
controller, tokens from a file or the environment, and one line with exit status 1 when
the controller cannot be reached, refuses, or is not an fc-controller."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import attrs
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import Controller, ControllerConfig
from controller.credentials import Access, TokenTable

from .conftest import MakeWorker, RunController, register

CLIENT_TOKEN = "client-token-0123456789abcdef"


@attrs.frozen
class Ran:
    code: int
    out: str
    err: str


async def run_status(*args: str, env: dict[str, str] | None = None) -> Ran:
    """Run ``python -m controller status ARGS`` with a clean environment plus ``env``."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FC_CONTROLLER_")
        and k not in ("FASTCHAT_CONTROLLER_URL", "SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    environ.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "status",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
async def controller(
    run_controller: RunController, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> Controller:
    """A controller with two workers of model ``m``, one of them also serving ``big``."""
    controller = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    )
    a = await make_worker(model_names=["m", "big"], queue_length=2, speed=3)
    b = await make_worker(model_names=["m"])
    await register(http, controller, a, b)
    return controller


async def test_it_prints_the_models_and_their_workers(
    controller: Controller, make_worker: MakeWorker
) -> None:
    """Against a live controller: exit 0, a table of models with their counts, then each
    model's workers with state, queue and speed."""
    ran = await run_status("--controller-address", controller.url)
    assert (ran.code, ran.err) == (0, "")
    lines = ran.out.splitlines()
    assert lines[0].startswith("fc-controller ")
    assert "dispatch least_time" in lines[0]
    assert lines[1] == f"{controller.url}: 2 workers, 2 models"
    header = lines.index("MODEL  WORKERS  HEALTHY  EXPIRING  EJECTED  QUEUE  IN FLIGHT  SPEED")
    assert lines[header + 1].split() == ["big", "1", "1", "0", "0", "2", "0", "3"]
    assert lines[header + 2].split() == ["m", "2", "2", "0", "0", "2", "0", "4"]
    worker_rows = [line.split() for line in lines if line.startswith("  http://")]
    assert len(worker_rows) == 3  # one worker under each of its two models
    assert all(row[1] == "healthy" for row in worker_rows)
    assert sorted(row[4] for row in worker_rows) == ["1", "3", "3"]


async def test_the_address_comes_from_fastchat_controller_url_without_the_flag(
    controller: Controller,
) -> None:
    """Without --controller-address, FASTCHAT_CONTROLLER_URL names the controller."""
    ran = await run_status(env={"FASTCHAT_CONTROLLER_URL": controller.url + "/"})
    assert ran.code == 0, ran.err
    assert f"{controller.url}: 2 workers" in ran.out


async def test_a_dead_controller_is_one_line_and_exit_status_1() -> None:
    """Nothing listening: exit 1, one line on stderr naming the address, nothing on stdout."""
    url = f"http://127.0.0.1:{free_port()}"
    ran = await run_status("--controller-address", url)
    assert ran.code == 1
    assert ran.out == ""
    assert ran.err.count("\n") == 1
    assert ran.err.startswith(f"fc-controller status: cannot reach the controller at {url}: ")


async def test_a_server_that_is_not_a_controller_is_one_line_and_exit_status_1(
    make_worker: MakeWorker,
) -> None:
    """A worker's address (no /api/workers there): exit 1, one line saying so."""
    worker = await make_worker()
    ran = await run_status("--controller-address", worker.url)
    assert ran.code == 1
    assert ran.err.count("\n") == 1
    assert "has no /api/workers (HTTP 404)" in ran.err


async def test_the_client_token_comes_from_the_file_or_the_environment(
    run_controller: RunController, tmp_path: Path
) -> None:
    """With client tokens on, no token is one line naming 401 and how to give one; the
    token from --api-token-file or FC_CONTROLLER_API_TOKENS gets the table; a wrong one
    gets 403 and is never printed."""
    tokens = TokenTable.from_lines([f"ops:{CLIENT_TOKEN}"], "test")
    closed = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, access=Access(client_tokens=tokens))
    )
    refused = await run_status("--controller-address", closed.url)
    assert refused.code == 1
    assert refused.err.count("\n") == 1
    assert "answered HTTP 401" in refused.err
    assert "--api-token-file" in refused.err

    token_file = tmp_path / "tokens"
    token_file.write_text(f"# the client role\nops:{CLIENT_TOKEN}\n")
    from_file = await run_status(
        "--controller-address", closed.url, "--api-token-file", str(token_file)
    )
    assert from_file.code == 0, from_file.err
    assert "0 workers, 0 models" in from_file.out
    assert "No workers are registered." in from_file.out

    from_env = await run_status(
        "--controller-address", closed.url, env={"FC_CONTROLLER_API_TOKENS": CLIENT_TOKEN}
    )
    assert from_env.code == 0, from_env.err

    wrong = "wrong-token-0123456789abcdef"
    forbidden = await run_status(
        "--controller-address", closed.url, env={"FC_CONTROLLER_API_TOKENS": wrong}
    )
    assert forbidden.code == 1
    assert "answered HTTP 403" in forbidden.err
    assert wrong not in forbidden.err + forbidden.out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--controller-address", "localhost:21001"], {}, "--controller-address must be a URL"),
        ([], {"FASTCHAT_CONTROLLER_URL": "ftp://x"}, "FASTCHAT_CONTROLLER_URL must be a URL"),
        (["--api-token-file", "/nonexistent/tokens"], {}, "--api-token-file: cannot read"),
        ([], {"FC_CONTROLLER_API_TOKENS": "short"}, "at least 16 characters"),
    ],
)
async def test_a_bad_flag_or_token_exits_2_naming_it(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """A malformed address or token source is a usage error: exit 2, the setting named."""
    ran = await run_status(*args, env=env)
    assert ran.code == 2
    assert message in ran.err


async def test_the_plain_command_s_help_is_the_controller_s_and_names_status() -> None:
    """``fc-controller --help`` is the controller's own (its flags), naming the status
    subcommand; ``fc-controller status --help`` is the subcommand's."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert b"--dispatch-method" in out
    assert b"fc-controller status" in out
    ran = await run_status("--help")
    assert ran.code == 0
    assert "usage: fc-controller status" in ran.out
    assert "--controller-address URL" in ran.out


async def test_terminal_output_escapes_control_characters() -> None:
    """Names holding escape sequences (from a controller that let them through, or is not
    ours) are printed escaped: nothing reaches the terminal that could move the cursor,
    retitle the window or recolour the text."""
    worker = {
        "name": "http://evil\x1b[2J:1",
        "models": ["m\x1b]0;owned\x07", "line\nbreak"],
        "state": "healthy",
        "queue_estimate": 0,
        "reported_queue_length": 0,
        "in_flight": 0,
        "speed": 1,
        "service_time": None,
        "heartbeat_age": 1.5,
        "expires": True,
        "failures_in_a_row": 0,
        "last_failure_age": None,
        "ejected_for": 0,
        "multimodal": False,
    }
    about = {
        "version": "0.1\x1b[31m",
        "dispatch_method": "least_time",
        "heart_beat_expiration": 90,
        "time": 0,
    }

    async def api_workers(request: web.Request) -> web.Response:
        return web.json_response({"controller": about, "workers": [worker]})

    app = web.Application()
    app.router.add_get("/api/workers", api_workers)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        ran = await run_status("--controller-address", str(server.make_url("")))
    finally:
        await server.close()
    assert ran.code == 0, ran.err
    assert "\x1b" not in ran.out
    assert "\x07" not in ran.out
    assert "http://evil\\x1b[2J:1" in ran.out
    assert "m\\x1b]0;owned\\x07" in ran.out
    assert "line\\nbreak" in ran.out
    assert ran.out.startswith("fc-controller 0.1\\x1b[31m, dispatch least_time")


async def test_an_https_controller_is_verified_against_ssl_cert_file(
    run_controller: RunController, tmp_path: Path
) -> None:
    """An https controller with a certificate from a private CA: refused (one line, exit
    1) until SSL_CERT_FILE names that CA, then the table."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_file, key, cert = tmp_path / "ca.pem", tmp_path / "key.pem", tmp_path / "cert.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key))
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(cert), append=i > 0)
    controller = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, ssl_keyfile=str(key), ssl_certfile=str(cert))
    )
    assert controller.url.startswith("https://")

    unverified = await run_status("--controller-address", controller.url)
    assert unverified.code == 1
    assert unverified.err.count("\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.err

    verified = await run_status(
        "--controller-address", controller.url, env={"SSL_CERT_FILE": str(ca_file)}
    )
    assert verified.code == 0, verified.err
    assert f"{controller.url}: 0 workers, 0 models" in verified.out
