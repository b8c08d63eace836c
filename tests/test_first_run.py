"""What a new user meets first: --help that shows every default, ports checked alike, error
messages that name flags, an embedding example that logs, a demo worker that does not
claim to leave a controller it never joined, and a quickstart that says how to reach a
controller on another port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from controller.cli import build_parser, load
from controller.worker.demo.cli import build_parser as build_demo_parser
from controller.worker.demo.cli import load_settings

from .conftest import wait_until
from .test_cli import controller_process, free_port, wait_for_line

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "parser", [build_parser(), build_demo_parser()], ids=["fc-controller", "fc-demo-worker"]
)
def test_every_option_in_help_shows_its_default(parser: argparse.ArgumentParser) -> None:
    """Each option of both commands' --help that takes a value names its default;
    only switches (and --help, --version) go without."""
    formatter = parser._get_formatter()
    silent = [
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings
        and action.nargs != 0
        and "default" not in formatter._expand_help(action)
    ]
    assert silent == []
    shown = parser.format_help()
    assert "(default: 21002)" in shown or "(default: 21001)" in shown


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_the_demo_worker_checks_the_port_range_as_the_controller_does(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """fc-demo-worker --port 99999 exits 2 with the controller's message, instead of
    listening on some other port."""
    messages = []
    for loader in (load_settings, load):
        with pytest.raises(SystemExit) as exit_info:
            loader(["--port", port], {})
        assert exit_info.value.code == 2
        messages.append(capsys.readouterr().err.splitlines()[-1].partition("error: ")[2])
    assert messages[0] == messages[1]
    assert "from 0 to 65535" in messages[0]


def test_a_parent_without_an_address_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """The error for --parent-controller on a wildcard address names --advertise-address,
    the flag to give, not the configuration field."""
    with pytest.raises(SystemExit) as exit_info:
        load(["--host", "0.0.0.0", "--parent-controller", "http://10.0.0.1:21001"], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--advertise-address" in err
    assert "advertise_address" not in err


async def test_the_embedding_example_logs(http: aiohttp.ClientSession) -> None:
    """examples/embed.py configures logging: a registration shows up on its stderr, with
    the request's id."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    embed = ("examples/embed.py",)
    args = ("--host", "127.0.0.1", "--port", str(port))
    async with controller_process(*args, program=embed, environ=os.environ) as proc:

        async def answering() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/healthz") as r:
                    return r.status == 200
            return False

        await wait_until(answering, timeout=20)
        body = {
            "worker_name": "http://127.0.0.1:1",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0},
        }
        headers = {"X-Request-Id": "embed-1"}
        async with http.post(f"{url}/register_worker", json=body, headers=headers) as r:
            assert r.status == 200
        line = await wait_for_line(proc, "Registered", timeout=20)
        assert "| embed-1 |" in line


async def test_a_worker_that_never_registered_does_not_say_it_leaves() -> None:
    """fc-demo-worker --no-register says it is stopping on SIGTERM, not that it is leaving
    a controller, and exits 0."""
    demo = ("-m", "controller.worker.demo")
    args = ("--host", "127.0.0.1", "--port", "0", "--no-register")
    async with controller_process(*args, program=demo, environ=os.environ) as process:
        await wait_for_line(process, "fc-demo-worker running on", timeout=20)
        process.send_signal(signal.SIGTERM)
        line = await wait_for_line(process, "Received SIGTERM", timeout=20)
        assert line.rstrip().endswith("Received SIGTERM: stopping")
        assert process.stderr is not None
        rest = (await asyncio.wait_for(process.stderr.read(), 20)).decode()
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert "leaving" not in line + rest


def test_the_quickstart_says_how_to_reach_a_controller_elsewhere() -> None:
    """The README's quickstart, which starts demo workers, tells how to point them at a
    controller on another port."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quickstart = readme.partition("## Quickstart")[2].partition("\n## ")[0]
    assert "fc-demo-worker" in quickstart
    assert "--controller-address" in quickstart
