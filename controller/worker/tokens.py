"""Bearer tokens, on both sides: the token file format and the header a token travels in.

A token file holds one ``NAME:TOKEN`` or bare ``TOKEN`` per line; blank lines and lines
starting with ``#`` are ignored. The controller reads whole files of them (one per role);
a worker, or a controller talking to its parent or its workers, reads a file holding its
one token. Standard library only: the thread client must stay free of aiohttp.

Error messages name the file and the line, never the token.
"""

from __future__ import annotations

import re

# No __all__ here: ``controller.worker`` lists the public names once, in its own.

#: RFC 6750's b64token: what may follow ``Bearer`` in an Authorization header. Nothing
#: else gets in, so a token can never smuggle a CR/LF into a request head.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: shorter tokens can be guessed by anyone who can reach the port
MIN_TOKEN_LENGTH = 16
#: a principal names whoever holds a token, in logs and ownership
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-._@]{0,63}")
_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def check_token(token: str, where: str) -> str:
    """``token`` if it is a usable bearer token, else ``ValueError`` naming ``where``."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(
            f"{where}: a token may hold only letters, digits and -._~+/ (then '=' padding); "
            f"this one of {len(token)} characters holds something else ({_HINT})"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{where}: a token must be at least {MIN_TOKEN_LENGTH} characters long, "
            f"got one of {len(token)} ({_HINT})"
        )
    return token


def parse_token_line(line: str, where: str) -> tuple[str | None, str] | None:
    """The ``(name, token)`` on one line (``name`` is ``None`` for a bare token), or
    ``None`` for a blank line or a comment; ``ValueError`` naming ``where`` if malformed."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    name, sep, token = text.partition(":")
    if not sep:
        return None, check_token(text, where)
    name, token = name.strip(), token.strip()
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{where}: the name before ':' must be 1 to 64 letters, digits or -._@, "
            f"starting with a letter or digit, got {name!r}"
        )
    return name, check_token(token, where)


def token_file_lines(path: str, where: str) -> list[str]:
    """The lines of the token file at ``path``; ``ValueError`` starting with ``where``
    (the flag that named it) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read {path!r}: {e}") from None


def read_token_file(path: str) -> str:
    """The one token in the file at ``path`` (a ``NAME:`` before it is allowed and
    ignored); ``ValueError`` saying what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the token file {path!r}: {e}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        parsed = parse_token_line(line, f"{path}, line {number}")
        if parsed is not None:
            tokens.append(parsed[1])
    if len(tokens) != 1:
        raise ValueError(
            f"the token file {path!r} must hold exactly one token, found {len(tokens)}"
        )
    return tokens[0]


def authorization(token: str | None) -> dict[str, str]:
    """The header that carries ``token`` (none without one)."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


#: the userinfo of a URL (``scheme://user:password@``) anywhere in a text
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]*@")


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it (``user:password@``) replaced
    by ``***@``: what goes into a log line."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text
