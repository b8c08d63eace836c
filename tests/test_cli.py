"""The command line: flags, environment and defaults, errors that exit 2, and the real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from controller import DispatchMethod
from controller.cli import build_parser, load_config

ENV_EXPIRATION = "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"
ENV_API_TIMEOUT = "FASTCHAT_WORKER_API_TIMEOUT"
REPO = Path(__file__).resolve().parent.parent


# -- load_config -------------------------------------------------------------------------


def test_defaults_match_fastchat() -> None:
    """Without flags or environment the settings are FastChat's defaults, but for the
    dispatch method, which is the one that does best (docs/dispatch.md)."""
    config, level = load_config([], {})
    assert (config.host, config.port) == ("localhost", 21001)
    assert config.dispatch_method is DispatchMethod.LEAST_TIME
    assert config.worker_slots == 5
    assert config.heart_beat_expiration == 90
    assert config.worker_api_timeout == 100
    assert config.status_probe_timeout == 5
    assert config.ssl_certfile is None
    assert level == "info"


def test_fastchat_flags_set_host_port_and_dispatch_method() -> None:
    """--host, --port and --dispatch-method reach the configuration."""
    config, _ = load_config(
        ["--host", "0.0.0.0", "--port", "31001", "--dispatch-method", "lottery"], {}
    )
    assert (config.host, config.port) == ("0.0.0.0", 31001)
    assert config.dispatch_method is DispatchMethod.LOTTERY


@pytest.mark.parametrize(
    ("argv", "environ", "expiration", "api_timeout"),
    [
        pytest.param([], {}, 90, 100, id="defaults"),
        pytest.param([], {ENV_EXPIRATION: "", ENV_API_TIMEOUT: ""}, 90, 100, id="empty-env"),
        pytest.param([], {ENV_EXPIRATION: "30", ENV_API_TIMEOUT: "7.5"}, 30, 7.5, id="env"),
        pytest.param(
            ["--heart-beat-expiration", "12", "--worker-api-timeout", "3"],
            {ENV_EXPIRATION: "30", ENV_API_TIMEOUT: "7.5"},
            12,
            3,
            id="flag-beats-env",
        ),
        pytest.param(
            ["--worker-api-timeout", "3"], {ENV_EXPIRATION: "30"}, 30, 3, id="mixed-sources"
        ),
    ],
)
def test_flag_beats_environment_beats_default(
    argv: list[str], environ: dict[str, str], expiration: float, api_timeout: float
) -> None:
    """Heartbeat expiration and worker API timeout come from the flag, else env, else default."""
    config, _ = load_config(argv, environ)
    assert config.heart_beat_expiration == expiration
    assert config.worker_api_timeout == api_timeout


def test_our_flags_read_fc_controller_variables_below_the_flag() -> None:
    """Each flag of ours without a FastChat variable is read from FC_CONTROLLER_<FLAG>
    when it is not given; a flag given on the command line wins; empty counts as unset."""
    environ = {
        "FC_CONTROLLER_PORT": "21555",
        "FC_CONTROLLER_DISPATCH_METHOD": "lottery",
        "FC_CONTROLLER_STATE_FILE": "/tmp/fc-state.json",
        "FC_CONTROLLER_MAX_BODY_SIZE": "2MiB",
        "FC_CONTROLLER_LOAD_POLL_INTERVAL": "0",
        "FC_CONTROLLER_LOG_LEVEL": "debug",
        "FC_CONTROLLER_HOST": "",
    }
    config, level = load_config(["--port", "21666"], environ)
    assert config.port == 21666
    assert config.dispatch_method.value == "lottery"
    assert config.state_file == "/tmp/fc-state.json"
    assert config.max_body_size == 2 * 1024 * 1024
    assert config.load_poll_interval == 0
    assert config.host == "localhost"
    assert level == "debug"


def test_load_config_reads_only_the_environ_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config(environ=...) ignores the process environment."""
    monkeypatch.setenv(ENV_EXPIRATION, "not a number")
    monkeypatch.setenv(ENV_API_TIMEOUT, "5")
    config, _ = load_config([], {})
    assert (config.heart_beat_expiration, config.worker_api_timeout) == (90, 100)


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--heart-beat-expiration", "soon"], {}, "--heart-beat-expiration"),
        (["--heart-beat-expiration", "0"], {}, "--heart-beat-expiration"),
        (["--heart-beat-expiration", "-5"], {}, "--heart-beat-expiration"),
        (["--heart-beat-expiration", "nan"], {}, "--heart-beat-expiration"),
        (["--worker-api-timeout", "inf"], {}, "--worker-api-timeout"),
        (["--worker-api-timeout", ""], {}, "--worker-api-timeout"),
        ([], {ENV_EXPIRATION: "abc"}, ENV_EXPIRATION),
        ([], {ENV_EXPIRATION: "-1"}, ENV_EXPIRATION),
        ([], {ENV_API_TIMEOUT: "0"}, ENV_API_TIMEOUT),
        ([], {ENV_API_TIMEOUT: "1 minute"}, ENV_API_TIMEOUT),
        (["--port", "70000"], {}, "--port"),
        (["--port", "http"], {}, "--port"),
        (["--dispatch-method", "random"], {}, "--dispatch-method"),
        ([], {"FC_CONTROLLER_PORT": "70000"}, "FC_CONTROLLER_PORT"),
        ([], {"FC_CONTROLLER_DISPATCH_METHOD": "random"}, "FC_CONTROLLER_DISPATCH_METHOD"),
        ([], {"FC_CONTROLLER_SSL": "maybe"}, "FC_CONTROLLER_SSL"),
        ([], {"FC_CONTROLLER_MAX_BODY_SIZE": "12"}, "FC_CONTROLLER_MAX_BODY_SIZE"),
        # the connection limits
        (["--header-timeout", "0"], {}, "--header-timeout"),
        (["--body-timeout", "-1"], {}, "--body-timeout"),
        (["--idle-timeout", "soon"], {}, "--idle-timeout"),
        (["--max-connections", "0"], {}, "--max-connections"),
        ([], {"FC_CONTROLLER_MAX_CONNECTIONS_PER_SOURCE": "many"}, "PER_SOURCE"),
        (["--max-worker-connections", "1"], {}, "--max-worker-connections"),
    ],
)
def test_invalid_value_exits_2_naming_the_flag_or_variable(
    argv: list[str], environ: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid flag or environment value exits with status 2 and a message naming it."""
    with pytest.raises(SystemExit) as exit_info:
        load_config(argv, environ)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        pytest.param({}, ["SSL_KEYFILE", "SSL_CERTFILE"], id="neither"),
        pytest.param({"SSL_KEYFILE": "key.pem"}, ["SSL_CERTFILE"], id="no-cert"),
        pytest.param({"SSL_CERTFILE": "cert.pem"}, ["SSL_KEYFILE"], id="no-key"),
    ],
)
def test_ssl_without_key_and_certificate_exits_2_naming_them(
    environ: dict[str, str], missing: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--ssl without SSL_KEYFILE and SSL_CERTFILE exits 2 and says which are not set."""
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--ssl"], environ)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in missing)


def test_ssl_with_unreadable_files_exits_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ssl with key and certificate paths that are not files exits 2 naming the variable."""
    environ = {"SSL_KEYFILE": str(tmp_path / "nokey.pem"), "SSL_CERTFILE": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--ssl"], environ)
    assert exit_info.value.code == 2
    assert "SSL_KEYFILE" in capsys.readouterr().err


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and documents every flag, FastChat's and ours."""
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"], {})
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = [
        "--host",
        "--port",
        "--dispatch-method",
        "--ssl",
        "--heart-beat-expiration",
        "--worker-api-timeout",
        "--status-probe-timeout",
        "--max-body-size",
        "--log-level",
    ]
    # And whatever was added since: no flag may hide from --help.
    expected += [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    missing = [flag for flag in expected if flag not in out]
    assert not missing
    assert ENV_EXPIRATION in out
    assert ENV_API_TIMEOUT in out
    assert "SSL_KEYFILE" in out and "SSL_CERTFILE" in out


# -- the real process --------------------------------------------------------------------


def test_ssl_with_a_real_certificate_configures_https(certificate: tuple[Path, Path]) -> None:
    """--ssl with a valid key and certificate yields an HTTPS configuration."""
    key, cert = certificate
    config, _ = load_config(["--ssl"], {"SSL_KEYFILE": str(key), "SSL_CERTFILE": str(cert)})
    assert (config.ssl_keyfile, config.ssl_certfile) == (str(key), str(cert))
    assert config.scheme == "https"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_environ(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FASTCHAT_") and k not in ("SSL_KEYFILE", "SSL_CERTFILE")
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def controller_process(
    *args: str,
    environ: Mapping[str, str] | None = None,
    program: tuple[str, ...] = ("-m", "controller"),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m controller ARGS`` (or ``python PROGRAM ARGS``); killed and reaped on the
    way out if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *program,
        *args,
        cwd=REPO,
        env=dict(environ) if environ is not None else clean_environ(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def wait_for_line(process: asyncio.subprocess.Process, text: str, timeout: float) -> str:
    """The first stderr line containing ``text``; fails if the process exits first."""
    assert process.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await process.stderr.readline()
            if not raw:
                raise AssertionError(f"exited before printing {text!r}: {seen}")
            line = raw.decode(errors="replace")
            seen.append(line)
            if text in line:
                return line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_process_serves_and_exits_0_on_signal(signum: int) -> None:
    """python -m controller prints its URL, answers /test_connection, exits 0 on the signal."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with controller_process("--host", "127.0.0.1", "--port", str(port)) as process:
        await wait_for_line(process, f"running on {url}", timeout=20)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/test_connection") as r:
                assert await r.json() == "success"
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), 5) == 0


async def test_process_serves_https_with_ssl(certificate: tuple[Path, Path]) -> None:
    """python -m controller --ssl serves HTTPS with the key and certificate from the env."""
    key, cert = certificate
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    environ = clean_environ(SSL_KEYFILE=str(key), SSL_CERTFILE=str(cert))
    async with controller_process(
        "--host", "127.0.0.1", "--port", str(port), "--ssl", environ=environ
    ) as process:
        await wait_for_line(process, f"running on {url}", timeout=20)
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/test_connection", ssl=trusted) as r:
                assert await r.json() == "success"
            # Plain HTTP on the same port is not served.
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/test_connection") as r:
                    await r.read()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5) == 0


async def test_process_with_ssl_but_no_files_exits_2_at_once() -> None:
    """python -m controller --ssl without SSL_KEYFILE/SSL_CERTFILE exits 2 instead of hanging."""
    async with controller_process("--port", str(free_port()), "--ssl") as process:
        _, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 2
        assert b"SSL_KEYFILE" in err and b"SSL_CERTFILE" in err
