"""The table of every setting in docs/cli.md, made from the parser: each flag with its
environment variable, configuration file key and default (as its ``--help`` says it).

``python -m controller.settings_doc docs/cli.md`` rewrites the table in place, keeping each
row's meaning; a new flag's row starts with its help text as its meaning. A test holds the
table to the parser, so no flag goes undocumented.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .options import build_parser, environment_variable, file_key, settings

__all__ = ["BEGIN", "END", "default_text", "main", "read_table", "render", "rows"]

BEGIN = "<!-- settings: `python -m controller.settings_doc docs/cli.md` makes this table -->"
END = "<!-- end of settings -->"
HEADER = ("flag", "environment variable", "file key", "default", "meaning")
_MARKER = "default: "


def default_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """What ``--help`` says a setting's default is (the text after its last
    ``default:``, up to the closing parenthesis); ``off`` for a switch; ``""`` when the
    help names none."""
    if action.nargs == 0:
        return "off"
    text = parser._get_formatter()._expand_help(action)
    at = text.rfind(_MARKER)
    return "" if at < 0 else text[at + len(_MARKER) :].removesuffix(")").strip()


def rows(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str, str, str]]:
    """Each setting's flag, variable, file key and default, as the table's cells show them."""
    parser = parser or build_parser()
    table = []
    for action in settings(parser):
        flag = next(o for o in action.option_strings if o.startswith("--"))
        key = file_key(action)
        table.append(
            (
                f"`{flag}`",
                f"`{environment_variable(action.dest)}`",
                f"`{key}`" if key else "",
                default_text(parser, action),
            )
        )
    return table


def _cells(line: str) -> list[str]:
    cells, current, escaped = [], "", False
    for char in line.strip().strip("|"):
        if char == "|" and not escaped:
            cells.append(current.strip())
            current = ""
        else:
            current += char
        escaped = char == "\\"
    return [*cells, current.strip()]


def read_table(document: str) -> list[list[str]]:
    """The rows of the settings table in ``document`` (header and rule left out)."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no settings table between {BEGIN!r} and {END!r}")
    lines = [x for x in document[start + len(BEGIN) : end].splitlines() if x.startswith("|")]
    return [_cells(line) for line in lines[2:]]


def render(parser: argparse.ArgumentParser, meanings: Mapping[str, str]) -> str:
    """The table, markers included; ``meanings`` by flag cell (e.g. ``"`--host`"``),
    else the help text."""
    formatter = parser._get_formatter()
    helps = {
        f"`{next(o for o in a.option_strings if o.startswith('--'))}`": formatter._expand_help(a)
        for a in settings(parser)
    }
    lines = [BEGIN, "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows(parser):
        meaning = meanings.get(row[0]) or helps[row[0]]
        cells = [cell.replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join([*cells, meaning]) + " |")
    return "\n".join([*lines, END])


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the settings table of the Markdown file named in ``argv``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m controller.settings_doc docs/cli.md", file=sys.stderr)
        return 2
    path = Path(args[0])
    document = path.read_text(encoding="utf-8")
    meanings = {row[0]: row[4] for row in read_table(document) if len(row) >= 5}
    start, end = document.index(BEGIN), document.index(END) + len(END)
    table = render(build_parser(), meanings)
    path.write_text(document[:start] + table + document[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
