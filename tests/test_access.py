"""Who may talk to the controller: roles and their tokens, 401 and 403 per endpoint, token
files, trusted networks, and the start-up warnings about what is left open."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller import Controller, ControllerConfig
from controller.cli import load_config
from controller.credentials import Access, Role, TokenTable, parse_networks, peer_address
from controller.edge.access import exposure_warnings, route_role

from .conftest import RunController

WORKER = "worker-token-0123456789abcdef"
CLIENT = "client-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdefgh"
WRONG = "wrong-token-0123456789abcdefgh"

TOKENS = {Role.WORKER: WORKER, Role.CLIENT: CLIENT, Role.ADMIN: ADMIN}
ALL_CLOSED = Access(
    worker_tokens=TokenTable.from_lines([f"w1:{WORKER}"], "test"),
    client_tokens=TokenTable.from_lines([f"c1:{CLIENT}"], "test"),
    admin_tokens=TokenTable.from_lines([f"root:{ADMIN}"], "test"),
)


def route_table() -> list[tuple[str, str]]:
    """Every (method, path) the controller serves, read from its application."""
    app = web.Application()
    Controller(ControllerConfig()).attach(app)
    return sorted(
        {
            (r.method, r.resource.canonical)
            for r in app.router.routes()
            if r.resource is not None and r.method in ("GET", "POST")
        }
    )


ROUTES = route_table()
GUARDED = [(m, p) for m, p in ROUTES if route_role(p) is not None]


def config(access: Access, **kwargs: Any) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, access=access, **kwargs)


async def call(
    controller: Controller, method: str, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, aiohttp.ClientResponse, bytes]:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{controller.url}{path}", headers=headers, **kwargs) as r,
    ):
        return r.status, r, await r.read()


def test_the_route_table_gives_each_endpoint_the_issue_s_role() -> None:
    """Worker endpoints need the worker role, /dispatch_decisions the admin's,
    /test_connection nobody's, and every other endpoint the client's."""
    roles = {path: route_role(path) for _, path in ROUTES}
    assert {p for p, r in roles.items() if r is Role.WORKER} == {
        "/register_worker",
        "/receive_heart_beat",
        "/unregister_worker",
    }
    assert roles["/test_connection"] is None
    assert roles["/dispatch_decisions"] is Role.ADMIN
    assert roles["/refresh_all_workers"] is Role.CLIENT
    assert len([p for p, r in roles.items() if r is Role.CLIENT]) >= 12


@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_missing_credentials_get_401_with_a_bearer_challenge(
    run_controller: RunController, method: str, path: str
) -> None:
    """Without a token, every guarded endpoint answers 401, WWW-Authenticate: Bearer, and a
    body naming the role it needs."""
    controller = await run_controller(config(ALL_CLOSED))
    status, response, body = await call(controller, method, path, json={"model": "m"})
    assert status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    role = route_role(path)
    assert role is not None
    assert role.value in body.decode()


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("presented", ["wrong", *[r.value for r in Role]])
async def test_a_wrong_token_or_another_role_s_gets_403_without_echoing_it(
    run_controller: RunController, method: str, path: str, presented: str
) -> None:
    """A token that does not grant the endpoint's role gets 403, and the answer never
    contains the token; the right token (or the admin's) passes the check."""
    controller = await run_controller(config(ALL_CLOSED))
    needed = route_role(path)
    token = WRONG if presented == "wrong" else TOKENS[Role(presented)]
    status, _, body = await call(controller, method, path, token, json={"model": "m"})
    if presented in (getattr(needed, "value", None), "admin"):
        assert status not in (401, 403)
    else:
        assert status == 403
        assert token.encode() not in body
        assert getattr(needed, "value", "") in body.decode()


async def test_test_connection_stays_open(run_controller: RunController) -> None:
    """/test_connection answers without credentials when every role is closed."""
    controller = await run_controller(config(ALL_CLOSED))
    assert (await call(controller, "GET", "/test_connection"))[0] == 200


async def test_the_check_comes_before_the_body_is_read(run_controller: RunController) -> None:
    """An unauthenticated body past max_body_size gets 401, not 413: nothing is read."""
    controller = await run_controller(config(ALL_CLOSED, max_body_size=1024))
    status, _, _ = await call(controller, "POST", "/list_models", data=b"x" * 100_000)
    assert status == 401


async def test_without_tokens_every_endpoint_is_open_as_in_fastchat(
    run_controller: RunController,
) -> None:
    """With nothing configured, workers and clients need no credentials."""
    controller = await run_controller(config(Access()))
    assert (await call(controller, "POST", "/list_models"))[0] == 200
    assert (await call(controller, "GET", "/dispatch_decisions"))[0] == 200
    body = {"worker_name": "http://127.0.0.1:9", "queue_length": 0}
    assert (await call(controller, "POST", "/receive_heart_beat", json=body))[0] == 200


async def test_dispatch_decisions_follow_the_client_role_without_admin_tokens(
    run_controller: RunController,
) -> None:
    """Without admin tokens, /dispatch_decisions is as closed as the client endpoints: a
    client token opens it, none gets 401."""
    access = Access(client_tokens=TokenTable.from_lines([CLIENT], "test"))
    controller = await run_controller(config(access))
    assert (await call(controller, "GET", "/dispatch_decisions"))[0] == 401
    assert (await call(controller, "GET", "/dispatch_decisions", CLIENT))[0] == 200


async def test_an_open_role_ignores_tokens_it_does_not_know(
    run_controller: RunController,
) -> None:
    """A worker sending a token to a controller whose worker role is open still works."""
    access = Access(client_tokens=TokenTable.from_lines([CLIENT], "test"))
    controller = await run_controller(config(access))
    body = {"worker_name": "http://127.0.0.1:9", "queue_length": 0}
    assert (await call(controller, "POST", "/receive_heart_beat", WRONG, json=body))[0] == 200


# -- token files ---------------------------------------------------------------------------


def test_token_files_take_names_bare_tokens_comments_and_blank_lines(tmp_path: Path) -> None:
    """NAME:TOKEN and bare TOKEN lines count; blank lines and # comments do not; a bare
    token's principal is a short hash that does not contain it."""
    path = tmp_path / "workers"
    path.write_text(f"# the GPU fleet\n\ngpu-a:{WORKER}\n   \n{WRONG}\n  # retired\n")
    config, _ = load_config(["--worker-token-file", str(path)], {})
    table = config.access.worker_tokens
    assert len(table) == 2
    assert table.principal_of(WORKER) == "gpu-a"
    bare = table.principal_of(WRONG)
    assert bare is not None and bare.startswith("token-") and len(bare) == 18
    assert WRONG not in bare
    assert table.principal_of(CLIENT) is None


def test_two_tokens_under_one_name_share_its_principal() -> None:
    """Rotation: the old and the new token under one name are the same principal."""
    table = TokenTable.from_lines([f"gpu-a:{WORKER}", f"gpu-a:{WRONG}"], "test")
    assert table.principal_of(WORKER) == table.principal_of(WRONG) == "gpu-a"
    assert table.principals == ("gpu-a",)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("short", "at least 16"),
        ("bad name:" + WORKER, "name before ':'"),
        ("tok\u00e9n" + WORKER, "only letters"),
    ],
)
def test_a_bad_token_line_exits_2_naming_the_line_but_not_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, problem: str
) -> None:
    """A malformed token file stops the controller with its path and line number, and the
    message never repeats the token."""
    path = tmp_path / "tokens"
    path.write_text(f"# ok\n{line}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--api-token-file", str(path)], {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}, line 2" in err and problem in err
    assert WORKER not in err


def test_the_same_token_twice_is_refused() -> None:
    """One token under two names would make ownership ambiguous: refused at start-up."""
    with pytest.raises(ValueError, match="already on"):
        TokenTable.from_lines([f"a:{WORKER}", f"b:{WORKER}"], "test")


def test_tokens_come_from_the_issue_s_variables_and_flags_win(tmp_path: Path) -> None:
    """FC_CONTROLLER_{WORKER,API,ADMIN}_TOKENS hold comma-separated tokens; a token file
    given as a flag replaces its variable."""
    environ = {
        "FC_CONTROLLER_WORKER_TOKENS": f"{WORKER}, gpu-b:{WRONG}",
        "FC_CONTROLLER_API_TOKENS": CLIENT,
        "FC_CONTROLLER_ADMIN_TOKENS": f"root:{ADMIN}",
    }
    config, _ = load_config([], environ)
    access = config.access
    assert len(access.worker_tokens) == 2
    assert access.worker_tokens.principal_of(WRONG) == "gpu-b"
    assert access.client_tokens.principal_of(CLIENT) is not None
    assert access.admin_tokens.principal_of(ADMIN) == "root"
    path = tmp_path / "api"
    path.write_text(f"web:{WRONG}\n")
    config, _ = load_config(["--api-token-file", str(path)], environ)
    assert config.access.client_tokens.principal_of(CLIENT) is None
    assert config.access.client_tokens.principal_of(WRONG) == "web"


def test_tokens_never_show_in_a_repr() -> None:
    """Neither the token tables nor the configuration print a token."""
    cfg = ControllerConfig(access=ALL_CLOSED, upstream_token=WRONG, parent_token=WORKER)
    text = repr(cfg)
    assert all(t not in text for t in (WORKER, CLIENT, ADMIN, WRONG))
    assert "root" in repr(ALL_CLOSED.admin_tokens)


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry is compared with hmac.compare_digest, even after a match."""
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)
    table = TokenTable.from_lines([WORKER, CLIENT, ADMIN], "test")
    assert table.principal_of(WORKER) is not None
    assert len(calls) == 3
    assert all(WORKER.encode() not in a + b for a, b in calls)


def test_the_gate_compares_every_token_of_a_role_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's token is compared with hmac.compare_digest against every token that may
    act in the role (the role's and the admins'), whichever matches and when."""
    import hmac

    from aiohttp.test_utils import make_mocked_request

    from controller.edge import access as gate_module

    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(gate_module, "compare_digest", spy)
    access = Access(
        client_tokens=TokenTable.from_lines([f"app:{CLIENT}", f"old:{WORKER}"], "test"),
        admin_tokens=TokenTable.from_lines([ADMIN], "test"),
    )
    gate = gate_module.Gate(access)
    request = make_mocked_request(
        "POST", "/get_worker_address", headers={"Authorization": f"Bearer {CLIENT}"}
    )
    caller = gate.identify(request, Role.CLIENT)
    assert isinstance(caller, gate_module.Caller)
    assert caller.owner.principal == "app"
    assert len(calls) == 3
    assert all(CLIENT.encode() not in a + b for a, b in calls)


# -- trusted networks ----------------------------------------------------------------------


async def test_a_trusted_network_needs_no_token(run_controller: RunController) -> None:
    """Clients from a trusted network pass without a token; a wrong token is still 403."""
    access = Access(
        client_tokens=TokenTable.from_lines([CLIENT], "test"),
        trust_clients_from=parse_networks(["127.0.0.0/8"], "test"),
    )
    controller = await run_controller(config(access))
    assert (await call(controller, "POST", "/list_models"))[0] == 200
    assert (await call(controller, "POST", "/list_models", WRONG))[0] == 403


async def test_trust_ignores_x_forwarded_for(run_controller: RunController) -> None:
    """Trust is decided on the TCP peer: a forwarded-for header from a trusted network
    opens nothing."""
    access = Access(trust_clients_from=parse_networks(["10.0.0.0/8"], "test"))
    controller = await run_controller(config(access))
    headers = {"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3", "Forwarded": "for=10.1.2.3"}
    status, _, _ = await call(controller, "POST", "/list_models", headers=headers)
    assert status == 401


def test_ipv4_mapped_peers_count_as_their_ipv4_address() -> None:
    """::ffff:10.1.2.3 is inside 10.0.0.0/8; an address outside stays out."""
    access = Access(trust_workers_from=parse_networks(["10.0.0.0/8"], "test"))
    assert access.trusts(Role.WORKER, peer_address("::ffff:10.1.2.3"))
    assert not access.trusts(Role.WORKER, peer_address("::ffff:11.1.2.3"))
    assert not access.trusts(Role.CLIENT, peer_address("10.1.2.3"))


def test_trusted_networks_come_from_repeatable_flags_or_comma_separated_variables() -> None:
    """--trust-workers-from repeats; FC_CONTROLLER_TRUST_CLIENTS_FROM separates by commas;
    a bad network exits 2."""
    environ = {"FC_CONTROLLER_TRUST_CLIENTS_FROM": "10.0.0.0/8, fd00::/8"}
    args = ["--trust-workers-from", "192.168.0.0/16", "--trust-workers-from", "10.9.9.9"]
    config, _ = load_config(args, environ)
    assert [str(n) for n in config.access.trust_workers_from] == ["192.168.0.0/16", "10.9.9.9/32"]
    assert [str(n) for n in config.access.trust_clients_from] == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(SystemExit):
        load_config(["--trust-clients-from", "not-a-network"], {})


# -- warnings at start-up ------------------------------------------------------------------


def test_open_roles_on_a_public_address_are_each_warned_about() -> None:
    """Listening beyond loopback, each open role is one warning naming the flags that
    close it; on loopback there is none."""
    warnings = exposure_warnings(ControllerConfig(host="0.0.0.0"))
    assert len(warnings) == 2
    assert "--worker-token-file" in warnings[0] and "--trust-workers-from" in warnings[0]
    assert "--api-token-file" in warnings[1] and "--trust-clients-from" in warnings[1]
    assert exposure_warnings(ControllerConfig(host="127.0.0.1")) == []
    assert exposure_warnings(ControllerConfig(host="localhost")) == []


def test_tokens_without_tls_on_a_public_address_are_warned_about() -> None:
    """Tokens configured, a public address and no TLS: a warning that tokens travel in
    clear (and none for the closed roles)."""
    warnings = exposure_warnings(ControllerConfig(host="10.1.2.3", access=ALL_CLOSED))
    assert len(warnings) == 1 and "in clear" in warnings[0]


async def test_the_warnings_are_logged_at_start_up(
    run_controller: RunController, caplog: pytest.LogCaptureFixture
) -> None:
    """A controller serving on every interface with nothing configured logs one WARNING
    per open role."""
    with caplog.at_level(logging.WARNING, logger="controller"):
        await run_controller(ControllerConfig(host="0.0.0.0", port=0, load_poll_interval=0))
    opened = [r for r in caplog.records if r.levelno == logging.WARNING and "is open" in r.message]
    assert len(opened) == 2
