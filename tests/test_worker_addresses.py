"""The worker address policy (issue 15): what a worker_name may look like, what it may
resolve to, and that every connection the controller opens is checked again, so the
controller cannot be made a relay into its own network, nor loop on itself."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller import ControllerConfig
from controller.cli import load_config
from controller.server import Controller

from .conftest import MakeWorker, RunController, post_ok, register_body, split_stream

STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}
GENERATE = {"model": "m", "prompt": "hi"}


class Canary:
    """A real HTTP server that records every request reaching it and answers each as a
    worker would, so a relay into it would hand its answer back."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.seen: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self.server = TestServer(app, host=host)

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        if request.path.endswith("/worker_get_status"):
            return web.json_response(STATUS)
        if request.path.endswith("/worker_generate_stream"):
            return web.Response(body=b'{"text": "secret", "error_code": 0}\0')
        return web.json_response({"text": "secret", "error_code": 0})

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    """A canary on 127.0.0.1; closed after the test."""
    c = Canary()
    await c.server.start_server()
    yield c
    await c.server.close()


async def register_raw(
    http: aiohttp.ClientSession, controller: Controller, name: str, *, status: bool = True
) -> tuple[int, dict[str, Any] | None]:
    body = register_body(name, check_heart_beat=False)
    if status:
        body["worker_status"] = STATUS
    async with http.post(f"{controller.url}/register_worker", json=body) as r:
        return r.status, json.loads(await r.read())


async def use_every_relay(http: aiohttp.ClientSession, controller: Controller) -> list[bytes]:
    """Call every endpoint that relays to a worker of model m; the raw answers."""
    answers = []
    for path in ("/worker_generate_stream", "/worker_generate", "/model_details", "/count_token"):
        async with http.post(f"{controller.url}{path}", json=GENERATE) as r:
            answers.append(await r.read())
    return answers


def ssrf_names(port: int) -> list[tuple[str, str]]:
    """The issue's open-relay forms, each with a word the refusal must contain."""
    base = f"http://127.0.0.1:{port}"
    return [
        (f"{base}/admin/delete_all?confirm=yes&x=", "query"),
        (f"{base}/admin/delete_all#", "fragment"),
        (f"{base}/?", "query"),
        (f"{base}#", "fragment"),
        (f"http://user:s3cr3t@127.0.0.1:{port}/", "userinfo"),
        (f"http://user@127.0.0.1:{port}", "userinfo"),
        (f"{base}/../admin", "path"),
        (f"{base}/a/%2e%2e/admin", "path"),
        (f"{base}\\@evil", "userinfo"),
    ]


async def test_open_relay_forms_are_refused_and_reach_nothing(
    run_controller: RunController, http: aiohttp.ClientSession, canary: Canary
) -> None:
    """Query, fragment, userinfo and dot-segment worker names get 400 naming the rule,
    with a status or without (no blind POST), and no request ever reaches the canary."""
    controller = await run_controller()
    for name, rule in ssrf_names(canary.port):
        for status in (True, False):
            code, body = await register_raw(http, controller, name, status=status)
            assert code == 400, name
            assert body is not None and body["field"] == "worker_name"
            assert rule in body["message"], (name, body)
            assert "s3cr3t" not in body["message"]
    assert controller.registry.get(ssrf_names(canary.port)[0][0]) is None
    answers = await use_every_relay(http, controller)
    assert all(b"secret" not in a for a in answers)
    assert canary.seen == []


def refused_names() -> list[tuple[str, str]]:
    return [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://0xa9fea9fe/", "link-local"),  # 169.254.169.254 in hex
        ("http://2852039166/", "link-local"),  # and as one decimal number
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[fe80::1]:8/", "link-local"),
        ("http://0:8/", "unspecified"),
        ("http://0.0.0.0:8/", "unspecified"),
        ("http://[::]:8/", "unspecified"),
        ("http://224.0.0.1:8/", "multicast"),
        ("http://255.255.255.255:8/", "broadcast"),
        ("http://metadata.google.internal/", "resolve"),
        ("http://b\u00fccher.example/", "ASCII"),
        ("http://10.0.0.5:21002/" + "a" * 2030, "2048 bytes"),
        ("ftp://10.0.0.5:21002", "http"),
        ("http://10.0.0.5:0", "port"),
        ("http://10.0.0.5:99999", "port"),
        ("http://[1::2::3]:8", "IPv6"),
        ("http://10.0.0.5:21002/\x1b[2J", "control"),
    ]


@pytest.mark.parametrize(("name", "rule"), refused_names())
async def test_refused_addresses_get_400_naming_the_rule(
    run_controller: RunController, http: aiohttp.ClientSession, name: str, rule: str
) -> None:
    """Each refused form, however spelled, is a 400 naming the rule, and nothing is
    registered."""
    controller = await run_controller()
    code, body = await register_raw(http, controller, name)
    assert code == 400
    assert body is not None and body["field"] == "worker_name"
    assert rule in body["message"]
    assert controller.registry.get(name) is None


@pytest.mark.parametrize("host", ["0x7f000001", "2130706433", "127.1", "localhost", "[::1]"])
async def test_odd_spellings_are_judged_by_what_they_resolve_to(
    run_controller: RunController, http: aiohttp.ClientSession, host: str
) -> None:
    """Loopback in odd spellings is allowed by default (the quickstart) and refused by
    --worker-networks 10.0.0.0/8, whatever the spelling."""
    if host == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    name = f"http://{host}:21002"
    open_controller = await run_controller()
    assert (await register_raw(http, open_controller, name))[0] == 200
    closed = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, worker_networks=["10.0.0.0/8"])
    )
    code, body = await register_raw(http, closed, name)
    assert code == 400
    assert body is not None and "outside --worker-networks" in body["message"]


async def test_worker_networks_allow_what_they_list(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """--worker-networks may list a link-local block explicitly; unspecified, multicast
    and broadcast addresses stay refused whatever it lists."""
    config = ControllerConfig(
        host="127.0.0.1", port=0, worker_networks=["169.254.0.0/16", "0.0.0.0/0"]
    )
    controller = await run_controller(config)
    assert (await register_raw(http, controller, "http://169.254.10.10:8"))[0] == 200
    assert (await register_raw(http, controller, "http://0.0.0.0:8"))[0] == 400
    assert (await register_raw(http, controller, "http://224.0.0.1:8"))[0] == 400


def test_worker_networks_come_from_flags_or_the_environment() -> None:
    """--worker-networks is repeatable; FC_CONTROLLER_WORKER_NETWORKS is comma-separated;
    the flag wins; a bad block exits with status 2 naming its source."""
    flag = ["--worker-networks", "10.0.0.0/8", "--worker-networks", "fd00::/8"]
    config, _ = load_config(flag, {"FC_CONTROLLER_WORKER_NETWORKS": "192.168.0.0/16"})
    assert config.worker_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    env = {"FC_CONTROLLER_WORKER_NETWORKS": "192.168.0.0/16, 10.1.0.0/16"}
    config, _ = load_config([], env)
    assert [str(n) for n in config.worker_networks] == ["192.168.0.0/16", "10.1.0.0/16"]
    assert load_config([], {})[0].worker_networks == ()
    with pytest.raises(SystemExit) as exit_:
        load_config(["--worker-networks", "ten"], {})
    assert exit_.value.code == 2


async def test_the_controller_s_own_address_is_refused_in_any_spelling(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """The controller's listening address, with or without a slash, as localhost, in
    numeric spellings, is a 400; the same host on another port is a worker."""
    controller = await run_controller()
    port = int(controller.url.rsplit(":", 1)[1])
    for name in (
        controller.url,
        controller.url + "/",
        f"http://localhost:{port}",
        f"http://127.1:{port}/",
        f"http://2130706433:{port}",
    ):
        code, body = await register_raw(http, controller, name)
        assert code == 400, name
        assert body is not None and "own address" in body["message"]
    assert (await register_raw(http, controller, f"http://127.0.0.1:{port + 1}"))[0] == 200


async def test_a_wildcard_listener_refuses_every_local_address_on_its_port(
    run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Listening on 0.0.0.0, every address of this host on its port is the controller
    (127.0.0.2 included), and so is the address it advertises."""
    config = ControllerConfig(host="0.0.0.0", port=0, advertise_address="http://10.9.8.7:4444")
    controller = await run_controller(config)
    port = int(controller.url.rsplit(":", 1)[1])
    for name in (f"http://127.0.0.2:{port}", f"http://localhost:{port}/"):
        assert (await register_raw(http, controller, name))[0] == 400, name
    code, body = await register_raw(http, controller, "http://10.9.8.7:4444/")
    assert code == 400
    assert body is not None and "advertised" in body["message"]
    assert (await register_raw(http, controller, "http://10.9.8.7:4445"))[0] == 200


Resolver = Callable[..., Awaitable[list[Any]]]


@pytest.fixture
async def rebind(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The running loop's getaddrinfo, answering ``rebind.test`` with whatever address the
    returned dict holds at the moment (DNS the attacker controls)."""
    answer = {"address": "127.0.0.1"}
    loop = asyncio.get_running_loop()
    real: Resolver = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "rebind.test":
            return await real(answer["address"], port, *args, **kwargs)
        return await real(host, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return answer


async def test_dns_rebinding_is_refused_at_connect_time(
    run_controller: RunController, http: aiohttp.ClientSession, rebind: dict[str, str]
) -> None:
    """A name that resolved to an allowed address at registration and to a forbidden one
    when the controller connects gets nowhere, in the relay's pool and in status probes:
    the canary on the rebound address never sees a request."""
    canary = Canary("127.0.0.2")
    await canary.server.start_server()
    try:
        config = ControllerConfig(host="127.0.0.1", port=0, worker_networks=["127.0.0.1/32"])
        controller = await run_controller(config)
        name = f"http://rebind.test:{canary.port}"
        assert (await register_raw(http, controller, name))[0] == 200
        rebind["address"] = "127.0.0.2"  # the attacker's DNS changes its answer
        answers = await use_every_relay(http, controller)
        assert split_stream(answers[0])[-1]["error_code"] == 50006
        assert all(b"secret" not in a for a in answers)
        await post_ok(http, controller, "/refresh_all_workers")
        assert controller.registry.get(name) is None  # its status probe was refused
        assert canary.seen == []
    finally:
        await canary.server.close()


async def test_rebinding_to_an_unspecified_address_is_refused_by_default(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    rebind: dict[str, str],
    canary: Canary,
) -> None:
    """With the default policy, a name rebound to 0.0.0.0 (which Linux connects to the
    loopback listener) is refused on connect: the canary behind it sees nothing."""
    controller = await run_controller()
    name = f"http://rebind.test:{canary.port}"
    assert (await register_raw(http, controller, name))[0] == 200
    rebind["address"] = "0.0.0.0"
    answers = await use_every_relay(http, controller)
    assert all(b"secret" not in a for a in answers)
    await post_ok(http, controller, "/refresh_all_workers")
    assert canary.seen == []


async def redirecting_worker(canary: Canary) -> TestServer:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{canary.port}{request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_redirects_are_never_followed(
    run_controller: RunController, http: aiohttp.ClientSession, canary: Canary
) -> None:
    """A worker answering 307 to the canary, to a status probe or a relayed call, does
    not send the controller there: nothing is registered from it, nothing reaches it."""
    worker = await redirecting_worker(canary)
    try:
        controller = await run_controller()
        name = str(worker.make_url("")).rstrip("/")
        assert (await register_raw(http, controller, name, status=False))[0] == 200
        assert controller.registry.get(name) is None
        assert (await register_raw(http, controller, name))[0] == 200
        answers = await use_every_relay(http, controller)
        assert all(b"secret" not in a for a in answers)
        assert canary.seen == []
    finally:
        await worker.close()


async def test_requests_go_only_to_worker_paths_under_the_prefix(
    run_controller: RunController, http: aiohttp.ClientSession, canary: Canary
) -> None:
    """A worker registered with a path prefix gets the protocol's paths under it, and
    nothing else."""
    controller = await run_controller()
    name = f"http://127.0.0.1:{canary.port}/pool/a"
    assert (await register_raw(http, controller, name, status=False))[0] == 200
    await use_every_relay(http, controller)
    assert canary.seen == [
        "/pool/a/worker_get_status",
        "/pool/a/worker_generate_stream",
        "/pool/a/worker_generate",
        "/pool/a/model_details",
        "/pool/a/count_token",
    ]


async def test_a_real_worker_still_works(
    run_controller: RunController, http: aiohttp.ClientSession, make_worker: MakeWorker
) -> None:
    """A worker on loopback, registered as FastChat's register, streams as before."""
    controller = await run_controller()
    worker = await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(worker, status=False))
    async with http.post(f"{controller.url}/worker_generate_stream", json=GENERATE) as r:
        messages = split_stream(await r.read())
    assert messages[-1]["error_code"] == 0
