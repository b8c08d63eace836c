"""``--registry`` and ``--registry-password-file``: defaults, environment, usage errors
(exit 2 with a message naming the problem, never the password)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from controller import ControllerConfig
from controller.cli import load_config
from controller.errors import ConfigError


def test_the_default_is_the_memory_registry() -> None:
    config, _ = load_config([], {})
    assert config.registry == "memory"
    assert not config.shared_registry


def test_the_flag_beats_the_environment_which_beats_the_default() -> None:
    env = {"FC_CONTROLLER_REGISTRY": "redis://10.0.0.5:6379/1"}
    config, _ = load_config([], env)
    assert config.registry == "redis://10.0.0.5:6379/1" and config.shared_registry
    config, _ = load_config(["--registry", "rediss://cache.internal/2"], env)
    assert config.registry == "rediss://cache.internal/2"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://10.0.0.5:6379/0", "'memory' or a URL such as redis://"),
        ("redis://:hunter22@10.0.0.5:99999/0", "Port out of range"),
        ("redis:///0", "names no host"),
        ("redis://:hunter22@10.0.0.5:6379/zero", "the database must be a number"),
        ("redis://10.0.0.5:6379/0?ssl=1", "no query"),
        ("memroy", "'memory' or a URL"),
    ],
)
def test_a_bad_registry_exits_2_naming_the_problem_never_the_password(
    value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, env, named in (
        (["--registry", value], {}, "--registry"),
        ([], {"FC_CONTROLLER_REGISTRY": value}, "FC_CONTROLLER_REGISTRY"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            load_config(argv, env)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert problem in err and named in err
        assert "hunter22" not in err


def test_a_state_file_with_a_redis_registry_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--registry", "redis://127.0.0.1/0", "--state-file", "/tmp/state.json"], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--state-file" in err and "--registry" in err
    with pytest.raises(ConfigError, match="state_file"):
        ControllerConfig(registry="redis://127.0.0.1/0", state_file="/tmp/state.json")


def test_the_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "redis-password"
    path.write_text("hunter22-but-longer\n")
    config, _ = load_config(
        ["--registry", "redis://127.0.0.1:6379/0", "--registry-password-file", str(path)], {}
    )
    assert config.registry_password == "hunter22-but-longer"
    assert "hunter22" not in repr(config)
    config = ControllerConfig(registry="redis://:hunter22@127.0.0.1/0")
    assert "hunter22" not in repr(config)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--registry-password-file", "{file}"], "needs a Redis --registry"),
        (["--registry", "redis://h/0", "--registry-password-file", "{missing}"], "cannot read"),
        (["--registry", "redis://h/0", "--registry-password-file", "{empty}"], "is empty"),
        (
            ["--registry", "redis://:pw@h/0", "--registry-password-file", "{file}"],
            "not both",
        ),
    ],
)
def test_a_bad_password_file_exits_2(
    argv: list[str], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("pw-from-file\n")
    (tmp_path / "empty").write_text("\n")
    paths = {k: str(tmp_path / k) for k in ("file", "missing", "empty")}
    with pytest.raises(SystemExit) as exit_info:
        load_config([a.format(**paths) for a in argv], {})
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err


def test_help_shows_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--help"], {})
    out = " ".join(capsys.readouterr().out.split())
    assert "--registry memory|URL" in out and "(default: memory)" in out
    assert "--registry-password-file PATH" in out


async def test_the_process_refuses_a_state_file_with_redis_at_once() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "--registry",
        "redis://127.0.0.1:1/0",
        "--state-file",
        "state.json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"--state-file cannot be combined" in err
