"""The flags that decide who may talk to the controller, what it sends to others, and TLS.

The token and trusted-network flags read the environment variables issue 15 names
(``FC_CONTROLLER_WORKER_TOKENS`` holds tokens, not a path; ``FC_CONTROLLER_TRUST_*`` hold
comma-separated networks), not the generic ``FC_CONTROLLER_<FLAG>`` that
``controller.options`` gives the other flags; :data:`SPECIAL_DESTS` tells it which these
are. The TLS file flags use the generic variables. Precedence: flag, then environment.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from typing import Any

from .credentials import Access, TokenTable, parse_networks
from .errors import ConfigError
from .worker.tokens import check_token, read_token_file, token_file_lines

__all__ = ["SPECIAL_DESTS", "SPECIAL_VARIABLES", "access_settings", "add_access_flags"]

ENV_SSL_KEYFILE = "SSL_KEYFILE"
ENV_SSL_CERTFILE = "SSL_CERTFILE"

#: role token files: flag destination -> (flag, variable holding comma-separated tokens)
_TOKEN_FILES = {
    "worker_token_file": ("--worker-token-file", "FC_CONTROLLER_WORKER_TOKENS"),
    "api_token_file": ("--api-token-file", "FC_CONTROLLER_API_TOKENS"),
    "admin_token_file": ("--admin-token-file", "FC_CONTROLLER_ADMIN_TOKENS"),
}
#: trusted networks: destination -> (flag, variable holding comma-separated networks)
_NETWORKS = {
    "trust_workers_from": ("--trust-workers-from", "FC_CONTROLLER_TRUST_WORKERS_FROM"),
    "trust_clients_from": ("--trust-clients-from", "FC_CONTROLLER_TRUST_CLIENTS_FROM"),
    "worker_networks": ("--worker-networks", "FC_CONTROLLER_WORKER_NETWORKS"),
}
_NETWORK_HELP = {
    "trust_workers_from": "workers connecting from this network need no token (decided on "
    "the TCP peer address, never X-Forwarded-For)",
    "trust_clients_from": "clients connecting from this network need no token (decided on "
    "the TCP peer address, never X-Forwarded-For)",
    "worker_networks": "every address a worker's name resolves to must fall inside one of "
    "these networks",
}
#: what each trusted-network flag means when it is not given
_NETWORK_DEFAULT = {
    "trust_workers_from": "none",
    "trust_clients_from": "none",
    "worker_networks": "any but link-local, unspecified, multicast and broadcast",
}
#: tokens this controller sends: destination -> (flag, variable holding the token)
_OWN_TOKENS = {
    "upstream_token_file": ("--upstream-token-file", "FC_CONTROLLER_UPSTREAM_TOKEN"),
    "parent_token_file": ("--parent-token-file", "FC_PARENT_CONTROLLER_TOKEN"),
}
#: flags whose environment variables are read here, not by the generic mechanism, and
#: those variables
SPECIAL_VARIABLES = {
    dest: var
    for table in (_TOKEN_FILES, _NETWORKS, _OWN_TOKENS)
    for dest, (_, var) in table.items()
}
SPECIAL_DESTS = frozenset(SPECIAL_VARIABLES)

_ROLE_HELP = {
    "worker_token_file": "tokens of the worker role (/register_worker, /receive_heart_beat, "
    "/unregister_worker)",
    "api_token_file": "tokens of the client role (every other endpoint but /test_connection)",
    "admin_token_file": "tokens of the admin role (accepted everywhere; needed for "
    "/dispatch_decisions and to change a registration someone else owns)",
}


def add_access_flags(parser: argparse.ArgumentParser) -> None:
    for dest, (flag, var) in _TOKEN_FILES.items():
        parser.add_argument(
            flag,
            dest=dest,
            default=None,
            metavar="PATH",
            help=f"{_ROLE_HELP[dest]}: one NAME:TOKEN or TOKEN per line; without any, the "
            f"role is open unless trusted networks close it (env {var} holding "
            "comma-separated tokens; default: none)",
        )
    for dest, (flag, var) in _NETWORKS.items():
        parser.add_argument(
            flag,
            dest=dest,
            action="append",
            default=None,
            metavar="CIDR",
            help=f"{_NETWORK_HELP[dest]} (repeatable; env {var}, comma-separated; "
            f"default: {_NETWORK_DEFAULT[dest]})",
        )
    parser.add_argument(
        "--upstream-token-file",
        default=None,
        metavar="PATH",
        help="send the token in PATH as a bearer token on every request to workers and "
        "child controllers (env FC_CONTROLLER_UPSTREAM_TOKEN holding the token; "
        "default: none)",
    )
    parser.add_argument(
        "--parent-token-file",
        default=None,
        metavar="PATH",
        help="send the token in PATH to the parent controller (env "
        "FC_PARENT_CONTROLLER_TOKEN holding the token; default: none)",
    )
    parser.add_argument(
        "--ssl-keyfile",
        default=None,
        metavar="PATH",
        help=f"TLS private key; implies --ssl (default: ${ENV_SSL_KEYFILE} with --ssl)",
    )
    parser.add_argument(
        "--ssl-certfile",
        default=None,
        metavar="PATH",
        help=f"TLS certificate chain; implies --ssl (default: ${ENV_SSL_CERTFILE} with --ssl)",
    )
    parser.add_argument(
        "--ssl-client-ca-certs",
        default=None,
        metavar="PATH",
        help="require client certificates signed by these CA certificates (mutual TLS; "
        "needs TLS; default: none)",
    )
    parser.add_argument(
        "--worker-ca-certs",
        default=None,
        metavar="PATH",
        help="verify https workers and the parent against these CA certificates "
        "(default: the system's trust store)",
    )


def access_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]
) -> dict[str, Any]:
    """The ``ControllerConfig`` fields these flags set; exits with status 2 naming the flag
    or variable when one is wrong."""
    try:
        tables = {dest: _token_table(args, env, dest) for dest in _TOKEN_FILES}
        networks = {
            dest: parse_networks(values, source)
            for dest, (values, source) in ((d, _network_values(args, env, d)) for d in _NETWORKS)
        }
        own = {dest: _own_token(args, env, dest) for dest in _OWN_TOKENS}
    except ConfigError as e:
        parser.error(str(e))
    return {
        "access": Access(
            worker_tokens=tables["worker_token_file"],
            client_tokens=tables["api_token_file"],
            admin_tokens=tables["admin_token_file"],
            trust_workers_from=networks["trust_workers_from"],
            trust_clients_from=networks["trust_clients_from"],
        ),
        "worker_networks": networks["worker_networks"],
        "upstream_token": own["upstream_token_file"],
        "parent_token": own["parent_token_file"],
        **_tls(parser, args, env),
    }


def _token_table(args: argparse.Namespace, env: Mapping[str, str], dest: str) -> TokenTable:
    flag, var = _TOKEN_FILES[dest]
    path = getattr(args, dest)
    if path is not None:
        try:
            lines = token_file_lines(path, flag)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        table = TokenTable.from_lines(lines, f"{flag} {path}")
        if not table:
            raise ConfigError(f"{flag}: {path!r} holds no token (a role with none is open)")
        return table
    return TokenTable.from_env(env.get(var, ""), var)


def _network_values(
    args: argparse.Namespace, env: Mapping[str, str], dest: str
) -> tuple[list[str], str]:
    flag, var = _NETWORKS[dest]
    given: list[str] | None = getattr(args, dest)
    if given is not None:
        return given, flag
    return env.get(var, "").split(","), f"environment variable {var}"


def _own_token(args: argparse.Namespace, env: Mapping[str, str], dest: str) -> str | None:
    flag, var = _OWN_TOKENS[dest]
    path = getattr(args, dest)
    try:
        if path is not None:
            return read_token_file(path)
        raw = env.get(var, "").strip()
        return check_token(raw, f"environment variable {var}") if raw else None
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}" if path is not None else str(e)) from None


def _tls(
    parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "ssl_keyfile": None,
        "ssl_certfile": None,
        "ssl_client_ca_certs": args.ssl_client_ca_certs,
        "worker_ca_certs": args.worker_ca_certs,
    }
    for flag, path in (
        ("--ssl-client-ca-certs", args.ssl_client_ca_certs),
        ("--worker-ca-certs", args.worker_ca_certs),
    ):
        if path is not None:
            try:
                ssl.create_default_context(cafile=path)
            except (OSError, ssl.SSLError) as e:
                parser.error(f"{flag}: cannot load CA certificates from {path!r}: {e}")
    if not (args.ssl or args.ssl_keyfile or args.ssl_certfile):
        if args.ssl_client_ca_certs is not None:
            parser.error("--ssl-client-ca-certs needs TLS: give --ssl-certfile and --ssl-keyfile")
        return settings
    # As FastChat: SSL_KEYFILE and SSL_CERTFILE are read only when TLS is asked for.
    named = (
        ("--ssl-keyfile", ENV_SSL_KEYFILE, args.ssl_keyfile or env.get(ENV_SSL_KEYFILE)),
        ("--ssl-certfile", ENV_SSL_CERTFILE, args.ssl_certfile or env.get(ENV_SSL_CERTFILE)),
    )
    missing = [var for _, var, value in named if not value]
    if missing:
        parser.error(
            f"--ssl needs the environment variables {ENV_SSL_KEYFILE} and "
            f"{ENV_SSL_CERTFILE} (or --ssl-keyfile and --ssl-certfile) set to the key and "
            f"certificate files; not set: {', '.join(missing)}"
        )
    for flag, var, path in named:
        if not os.path.isfile(str(path)):
            parser.error(f"{var}={path!r} ({flag}) is not a readable file")
    (_, key_var, keyfile), (_, cert_var, certfile) = named
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(certfile), str(keyfile)
        )
    except (OSError, ssl.SSLError) as e:
        parser.error(f"cannot load {cert_var}={certfile!r} with {key_var}={keyfile!r}: {e}")
    settings.update(ssl_keyfile=keyfile, ssl_certfile=certfile)
    return settings
