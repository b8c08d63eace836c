"""The configuration file: ``--config PATH`` (or ``FC_CONTROLLER_CONFIG``), in TOML.

Its keys are the long flags' names with ``_`` for ``-`` (``max_body_size = "64MiB"``),
taken from the parser, so every flag, present or future, is a key. Values are what the
flag takes: strings or numbers for values (``"64MiB"`` or ``67108864``, ``30`` or
``"30s"``), ``true``/``false`` for switches, and for repeatable flags an array of strings
(or one string, comma-separated as in the environment). Precedence: flag, environment,
file, default. An unreadable file, invalid TOML (with its line), an unknown key or a value
of the wrong type exits with status 2, naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Mapping
from typing import Any

from .options import convert_text, environment_variable, file_key, settings

__all__ = ["ENV_CONFIG", "apply_config_file", "config_path"]

ENV_CONFIG = "FC_CONTROLLER_CONFIG"


def config_path(
    args: argparse.Namespace, given: set[str], environ: Mapping[str, str]
) -> str | None:
    """The configuration file named by ``--config``, else by ``FC_CONTROLLER_CONFIG``."""
    if "config" in given:
        path: str | None = args.config
        return path
    return environ.get(ENV_CONFIG) or None


def apply_config_file(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    given: set[str],
    environ: Mapping[str, str],
) -> str | None:
    """Set each setting the configuration file holds on ``args``, unless its flag was
    ``given`` on the command line or its environment variable is set; returns the file's
    path (``None`` without one). Every key is checked, used or not."""
    path = config_path(args, given, environ)
    if path is None:
        return None
    table = _read(parser, path)
    actions = {key: action for action in settings(parser) if (key := file_key(action))}
    for key, value in table.items():
        action = actions.get(key)
        if action is None:
            near = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            parser.error(f"{path}: unknown key {key!r}{hint}; the keys are the flags' names")
        converted = _convert(parser, action, f"{path}: {key}", value)
        if action.dest in given or environ.get(environment_variable(action.dest)):
            continue
        setattr(args, action.dest, converted)
    return path


def _read(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        parser.error(f"--config: cannot read {path!r}: {e.strerror or e}")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        parser.error(f"{path}: not UTF-8 text (at line {line})")
    except tomllib.TOMLDecodeError as e:
        # The message names the line and column: "Invalid value (at line 3, column 7)".
        parser.error(f"{path}: not valid TOML: {e}")


def _convert(
    parser: argparse.ArgumentParser, action: argparse.Action, where: str, value: Any
) -> Any:
    if action.nargs == 0:  # a switch such as --ssl
        if isinstance(value, bool):
            return value
        parser.error(f"{where}: expected true or false, got {_shown(value)}")
    if isinstance(action, argparse._AppendAction):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            parser.error(f"{where}: expected an array of strings, got {_shown(value)}")
        for item in items:
            if not isinstance(item, str):
                parser.error(f"{where}: expected an array of strings, got {_shown(item)} in it")
        return [convert_text(parser, action, where, item.strip()) for item in items]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        parser.error(f"{where}: expected a string or a number, got {_shown(value)}")
    if action.type is None and not isinstance(value, str):
        parser.error(f"{where}: expected a string, got {_shown(value)}")
    return convert_text(parser, action, where, str(value))


def _shown(value: Any) -> str:
    """A TOML value as the message names it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"
