"""The configuration file: every flag is a key, flag > environment > file > default, and a
bad file exits 2 naming the file and the key (or line); docs/cli.md's table of settings is
the parser's."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from controller import ControllerConfig, DispatchMethod
from controller.cli import build_parser, load
from controller.options import file_key, settings
from controller.settings_doc import read_table, rows

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def write(tmp_path: Path, text: str, name: str = "fc.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- precedence --------------------------------------------------------------------------

#: what a setting is in a configuration
Read = Callable[[ControllerConfig], object]
#: one setting of each kind: (file line, flag, environment, how to read it, and what the
#: file, the flag, the environment and the default give)
Kind = tuple[str, list[str], dict[str, str], Read, tuple[object, object, object, object]]
KINDS: dict[str, Kind] = {
    "port (a number)": (
        "port = 31001",
        ["--port", "31002"],
        {"FC_CONTROLLER_PORT": "31003"},
        lambda c: c.port,
        (31001, 31002, 31003, 21001),
    ),
    "size (a string with a suffix)": (
        'max_body_size = "2MiB"',
        ["--max-body-size", "3MiB"],
        {"FC_CONTROLLER_MAX_BODY_SIZE": "4MiB"},
        lambda c: c.max_body_size,
        (2 * MiB, 3 * MiB, 4 * MiB, 64 * MiB),
    ),
    "duration with a unit, FastChat's variable": (
        'heart_beat_expiration = "2m"',
        ["--heart-beat-expiration", "7"],
        {"FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": "8"},
        lambda c: c.heart_beat_expiration,
        (120, 7, 8, 90),
    ),
    "a choice": (
        'dispatch_method = "lottery"',
        ["--dispatch-method", "shortest_queue"],
        {"FC_CONTROLLER_DISPATCH_METHOD": "power_of_two"},
        lambda c: c.dispatch_method,
        (
            DispatchMethod.LOTTERY,
            DispatchMethod.SHORTEST_QUEUE,
            DispatchMethod.POWER_OF_TWO,
            DispatchMethod.LEAST_TIME,
        ),
    ),
    "a list, issue 15's variable": (
        'trust_workers_from = ["10.0.0.0/8", "192.168.0.0/16"]',
        ["--trust-workers-from", "10.1.0.0/16"],
        {"FC_CONTROLLER_TRUST_WORKERS_FROM": "10.2.0.0/16"},
        lambda c: [str(n) for n in c.access.trust_workers_from],
        (["10.0.0.0/8", "192.168.0.0/16"], ["10.1.0.0/16"], ["10.2.0.0/16"], []),
    ),
    "a path": (
        'state_file = "/var/lib/fc/file.json"',
        ["--state-file", "/var/lib/fc/flag.json"],
        {"FC_CONTROLLER_STATE_FILE": "/var/lib/fc/env.json"},
        lambda c: c.state_file,
        ("/var/lib/fc/file.json", "/var/lib/fc/flag.json", "/var/lib/fc/env.json", None),
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path, kind: str) -> None:
    """For each kind of setting, the file's value is taken over the default, the
    environment's over the file's, and the flag's over both."""
    line, flag, environ, read, (from_file, from_flag, from_env, default) = KINDS[kind]
    path = write(tmp_path, line + "\n")
    config = ["--config", path]
    assert read(load([], {}).config) == default
    assert read(load(config, {}).config) == from_file
    assert read(load(config, environ).config) == from_env
    assert read(load([*config, *flag], environ).config) == from_flag
    assert read(load([*config, *flag], {}).config) == from_flag


def test_the_file_may_be_named_by_the_environment(tmp_path: Path) -> None:
    """FC_CONTROLLER_CONFIG names the file when --config is not given; --config wins."""
    by_env = write(tmp_path, "port = 31010\n", "env.toml")
    by_flag = write(tmp_path, "port = 31020\n", "flag.toml")
    assert load([], {"FC_CONTROLLER_CONFIG": by_env}).config.port == 31010
    assert load(["--config", by_flag], {"FC_CONTROLLER_CONFIG": by_env}).config.port == 31020
    assert load([], {"FC_CONTROLLER_CONFIG": by_env}).config_file == by_env


def test_switches_lists_sizes_and_durations_take_their_toml_types(tmp_path: Path) -> None:
    """Booleans for switches, arrays or one comma-separated string for repeatable flags,
    plain integers for sizes, numbers for durations, and the log settings."""
    path = write(
        tmp_path,
        "max_buffered_bytes = 2097152\n"
        "drain_timeout = 2.5\n"
        "load_poll_interval = 0\n"
        'worker_networks = "10.0.0.0/8, 127.0.0.0/8"\n'
        'profile = "tinychat"\n'
        'log_level = "debug"\n'
        'log_format = "json"\n',
    )
    loaded = load(["--config", path], {})
    config = loaded.config
    assert config.max_buffered_bytes == 2 * MiB
    assert (config.drain_timeout, config.load_poll_interval) == (2.5, 0)
    assert config.worker_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.0/8"),
    )
    # The profile from the file also brings TinyChat's shorter heartbeat expiration.
    assert (loaded.profile, config.heart_beat_expiration) == ("tinychat", 30)
    assert (loaded.log_level, loaded.log_format) == ("debug", "json")


def test_a_switch_in_the_file_yields_to_the_environment(tmp_path: Path) -> None:
    """ssl = true in the file, FC_CONTROLLER_SSL=false in the environment: no TLS (and so
    no complaint about missing key files)."""
    path = write(tmp_path, "ssl = true\n")
    assert load(["--config", path], {"FC_CONTROLLER_SSL": "false"}).config.ssl_certfile is None
    with pytest.raises(SystemExit):
        load(["--config", path], {})  # TLS asked for, and no key or certificate given


def test_every_flag_is_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each setting's key is accepted (a wrong value is refused as that key's, never as an
    unknown key), so a flag added later is a key without further work."""
    for action in settings(build_parser()):
        key = file_key(action)
        if key is None:
            continue
        path = write(tmp_path, f"{key} = {{ nested = 1 }}\n")
        with pytest.raises(SystemExit):
            load(["--config", path], {})
        err = capsys.readouterr().err
        assert f"{path}: {key}: expected" in err, err


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("max_body_sise = 5\n", ["max_body_sise", "max_body_size"], id="unknown-key"),
        pytest.param("config = 'other.toml'\n", ["'config'"], id="a-file-names-no-file"),
        pytest.param("port = true\n", ["port", "true"], id="bool-for-number"),
        pytest.param("port = 70000\n", ["port", "65535"], id="out-of-range"),
        pytest.param('max_body_size = "lots"\n', ["max_body_size", "'lots'"], id="bad-size"),
        pytest.param('drain_timeout = "soon"\n', ["drain_timeout", "'soon'"], id="bad-duration"),
        pytest.param('ssl = "yes"\n', ["ssl", "true or false"], id="string-for-switch"),
        pytest.param("host = 5\n", ["host", "a string"], id="number-for-string"),
        pytest.param("trust_workers_from = [1]\n", ["trust_workers_from", "1"], id="list-item"),
        pytest.param('dispatch_method = "random"\n', ["dispatch_method", "'random'"], id="choice"),
        pytest.param("[limits]\nport = 1\n", ["limits", "unknown key"], id="a-table"),
        pytest.param("port = 1\nhost = \n", ["line 2"], id="bad-toml"),
    ],
)
def test_a_bad_file_exits_2_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: list[str]
) -> None:
    """An unknown key, a value of the wrong type or invalid TOML stops the command with
    status 2 and a message naming the file and the key (or, for bad TOML, the line)."""
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_info:
        load(["--config", path], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert path in err
    for word in named:
        assert word in err


def test_a_missing_or_undecodable_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that cannot be read, or is not UTF-8 (with its line), exits 2 naming it."""
    missing = str(tmp_path / "nowhere.toml")
    with pytest.raises(SystemExit) as exit_info:
        load([], {"FC_CONTROLLER_CONFIG": missing})
    assert exit_info.value.code == 2
    assert missing in capsys.readouterr().err
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"port = 1\nhost = '\xe9'\n")
    with pytest.raises(SystemExit) as exit_info:
        load(["--config", str(latin)], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(latin) in err and "line 2" in err


def test_a_key_overridden_by_a_flag_is_still_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong value in the file is an error even when the flag would override it."""
    path = write(tmp_path, "port = 'http'\n")
    with pytest.raises(SystemExit):
        load(["--config", path, "--port", "1"], {})
    assert "port" in capsys.readouterr().err


# -- the documentation -------------------------------------------------------------------


def test_docs_table_is_every_setting_of_the_parser() -> None:
    """docs/cli.md's settings table lists each flag with its variable, file key and
    default exactly as the parser has them, in the parser's order, each with a meaning.
    When this fails, run ``python -m controller.settings_doc docs/cli.md``."""
    documented = read_table((REPO / "docs" / "cli.md").read_text(encoding="utf-8"))
    assert [tuple(row[:4]) for row in documented] == rows(build_parser())
    assert all(len(row) == 5 and row[4] for row in documented)
    assert all(row[3] for row in documented), "a setting whose --help names no default"
