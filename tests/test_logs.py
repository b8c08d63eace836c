"""Logs and the start-up line: --log-format json makes every stderr line one JSON object
(start-up line, request lines with their id, command-line errors); text lines show the
request id; the start-up line says what is in effect, credentials redacted."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller import ControllerConfig, __version__
from controller.credentials import Access, TokenTable
from controller.requestid import REQUEST_ID, RequestIdFilter
from controller.startup import startup_line
from controller.worker.logs import JsonFormatter, TextFormatter

from .conftest import MakeWorker, SpawnController, register_body

REPO = Path(__file__).resolve().parent.parent
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("controller.test", logging.WARNING, "", 0, message, args, exc_info)


# -- the formatters ----------------------------------------------------------------------


def test_a_json_line_is_one_object_with_the_exception_as_a_field() -> None:
    """A record with a traceback and line breaks in its message is still one line: a JSON
    object with time, level, logger, message and the traceback in ``exception``."""
    line = JsonFormatter().format(record("two\nlines \u202e %s", "caf\u00e9", exc=True))
    assert "\n" not in line and line.isascii()
    entry = json.loads(line)
    assert TIME.fullmatch(entry["time"])
    assert (entry["level"], entry["logger"]) == ("WARNING", "controller.test")
    assert entry["message"] == "two\nlines \u202e caf\u00e9"
    assert "Traceback" in entry["exception"] and "broken\nacross lines" in entry["exception"]
    assert "request_id" not in entry


def test_lines_logged_inside_a_request_carry_its_id() -> None:
    """With the filter, a line logged while a request is served carries its id, in the
    JSON object and in the text line; outside a request neither shows one."""
    filters = RequestIdFilter()
    token = REQUEST_ID.set("req-7")
    try:
        inside = record("inside")
        filters.filter(inside)
    finally:
        REQUEST_ID.reset(token)
    outside = record("outside")
    filters.filter(outside)
    assert json.loads(JsonFormatter().format(inside))["request_id"] == "req-7"
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
    assert TextFormatter().format(inside).endswith("| controller.test | req-7 | inside")
    assert TextFormatter().format(outside).endswith("| controller.test | outside")


# -- the start-up line -------------------------------------------------------------------


def test_the_startup_line_says_what_is_in_effect() -> None:
    """Version, profile, dispatch, parent (credentials redacted), protected roles, state
    file (quoted when it has a space), registry backend and configuration file."""
    tokens = TokenTable.from_env("a-worker-token-0123456789", "test")
    config = ControllerConfig(
        dispatch_method="power_of_two",
        parent_controller="http://admin:s3cret@parent.internal:21001",
        state_file="/var/lib/fc/my state.json",
        access=Access(worker_tokens=tokens, admin_tokens=tokens),
    )
    line = startup_line("http://localhost:21001", config, "tinychat", "/etc/fc.toml")
    assert line.startswith("fc-controller running on http://localhost:21001 (Press CTRL+C")
    assert f"version={__version__} " in line
    assert " profile=tinychat dispatch=power_of_two " in line
    assert " parent=http://***@parent.internal:21001 " in line
    assert "s3cret" not in line
    assert " protected=worker,admin " in line
    assert ' state_file="/var/lib/fc/my state.json" ' in line
    assert line.endswith(" registry=memory config=/etc/fc.toml")
    plain = startup_line("http://localhost:21001", ControllerConfig(), "fastchat")
    assert plain.endswith("parent=none protected=none state_file=none registry=memory config=none")
    shared = ControllerConfig(registry="redis://:r3dis-pw@redis.internal:6379/2")
    line = startup_line("http://localhost:21001", shared, "fastchat")
    assert " registry=redis://***@redis.internal:6379/2 " in line
    assert "r3dis-pw" not in line


# -- the real process --------------------------------------------------------------------


def parse(lines: list[str]) -> list[dict[str, Any]]:
    """Every line as JSON; fails on the first that is not one object."""
    entries = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


async def test_json_logs_from_start_to_stop_with_request_ids(
    spawn_controller: SpawnController, make_worker: MakeWorker, tmp_path: Path
) -> None:
    """A controller run with --log-format json (here from its configuration file) writes
    only JSON lines to stderr: the start-up line, registrations, a request's lines with its
    id, and the lines of stopping."""
    config = tmp_path / "fc.toml"
    config.write_text('log_format = "json"\nlog_level = "debug"\n', encoding="utf-8")
    process = await spawn_controller("--config", str(config))
    worker = await make_worker()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{process.url}/register_worker", json=register_body(worker)) as r:
            assert r.status == 200
        headers = {"X-Request-Id": "trace-42"}
        body = {"model": "m"}
        url = f"{process.url}/get_worker_address"
        async with http.post(url, json=body, headers=headers) as r:
            assert r.headers["X-Request-Id"] == "trace-42"
        async with http.post(url, json={"modle": "m"}, headers={"X-Request-Id": "bad.1"}) as r:
            assert r.status == 400
    await process.wait_for_line('"bad.1"')
    process.signal(signal.SIGTERM)
    assert await process.wait(10) == 0
    entries = parse(process.lines)
    (started,) = [e for e in entries if e["message"].startswith("fc-controller running on")]
    assert started["level"] == "INFO"
    assert f"{process.url} (Press CTRL+C to quit) version=" in started["message"]
    assert f"config={config}" in started["message"]
    assert any(e["message"].startswith("Registered") for e in entries), entries
    dispatched = [e for e in entries if e.get("request_id") == "trace-42"]
    assert dispatched and all("dispatch 'm'" in e["message"] for e in dispatched), dispatched
    assert any("bad request" in e["message"] for e in entries if e.get("request_id") == "bad.1")
    assert entries[-1]["message"] == "Stopped"


@pytest.mark.parametrize(
    ("args", "environ", "named"),
    [
        pytest.param(["--log-format", "json", "--port", "99999"], {}, "--port", id="flag"),
        pytest.param(["--port", "99999"], {"FC_CONTROLLER_LOG_FORMAT": "json"}, "--port", id="env"),
        pytest.param(["--config", "/nonexistent/fc.toml", "--log-format=json"], {}, "fc.toml"),
    ],
)
async def test_a_command_line_error_is_one_json_line(
    args: list[str], environ: dict[str, str], named: str
) -> None:
    """With the JSON format, a command-line error exits 2 with a single JSON line naming
    the flag or file, not argparse's usage text."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        *args,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **environ},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    (entry,) = parse(err.decode().splitlines())
    assert entry["level"] == "ERROR"
    assert named in entry["message"]


async def test_warnings_and_an_uncaught_exception_are_json_lines_too() -> None:
    """In the JSON format, a warning, an error ignored in a destructor and the exception
    that ends the program are JSON objects too, the traceback a field of one line."""
    program = (
        "import warnings\n"
        "from controller.worker.logs import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "warnings.warn('careful\\nnow')\n"
        "class Leaky:\n"
        "    def __del__(self):\n"
        "        raise ValueError('in a destructor')\n"
        "Leaky()\n"
        "raise RuntimeError('the end\\nof it')\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    warned, ignored, ended = parse(err.decode().splitlines())
    assert warned["logger"] == "py.warnings" and "careful\nnow" in warned["message"]
    assert "in a destructor" in ignored["exception"]
    assert ended["level"] == "CRITICAL"
    assert "RuntimeError: the end\nof it" in ended["exception"]
