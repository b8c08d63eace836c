"""Registrations belong to whoever made them: the token's principal, or the source host
when there was no token. Another host is a client socket bound to 127.0.0.2."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig
from controller.credentials import (
    Access,
    TokenTable,
    host_identity,
    parse_networks,
    peer_address,
)
from controller.decisions.models import Owner, WorkerInfo
from controller.decisions.ownership import Standing, standing
from controller.decisions.registry import Registry
from controller.sharing.state import dump, load

from .conftest import FakeClock, MakeWorker, RunController, register_body

NAME = "http://127.0.0.1:9"
A1 = "token-of-gpu-a-0123456789"
A2 = "new-token-of-gpu-a-012345"
B = "token-of-gpu-b-0123456789"
ADMIN = "admin-token-0123456789ab"

TOKENS = Access(
    worker_tokens=TokenTable.from_lines([f"gpu-a:{A1}", f"gpu-a:{A2}", f"gpu-b:{B}"], "test"),
    admin_tokens=TokenTable.from_lines([f"root:{ADMIN}"], "test"),
)


@contextlib.asynccontextmanager
async def host(address: str = "127.0.0.1") -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from ``address``."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    controller: Controller,
    path: str,
    body: Any,
    token: str | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(f"{controller.url}{path}", json=body, headers=headers) as r:
        return r.status, await r.json()


def status(queue_length: int = 0, models: tuple[str, ...] = ("m",)) -> dict[str, Any]:
    return {"model_names": list(models), "speed": 1, "queue_length": queue_length}


def registration(queue_length: int = 0, models: tuple[str, ...] = ("m",)) -> dict[str, Any]:
    return register_body(NAME, worker_status=status(queue_length, models))


def beat(queue_length: int) -> dict[str, Any]:
    return {"worker_name": NAME, "queue_length": queue_length}


@pytest.fixture
async def open_controller(run_controller: RunController, clock: FakeClock) -> Controller:
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    return await run_controller(config, clock=clock)


@pytest.fixture
async def closed_controller(run_controller: RunController) -> Controller:
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, access=TOKENS)
    return await run_controller(config)


def queue(controller: Controller) -> int:
    worker = controller.registry.get(NAME)
    assert worker is not None
    return worker.queue_length


# -- without tokens: the source host owns the registration --------------------------------


async def test_a_heartbeat_from_another_host_is_not_applied(open_controller: Controller) -> None:
    """Another host's heartbeat is answered exist: false and leaves the queue alone."""
    async with host() as owner, host("127.0.0.2") as stranger:
        assert (await post(owner, open_controller, "/register_worker", registration(1)))[0] == 200
        answer = await post(stranger, open_controller, "/receive_heart_beat", beat(1_000_000))
        assert answer == (200, {"exist": False})
        assert queue(open_controller) == 1
        answer = await post(owner, open_controller, "/receive_heart_beat", beat(2))
        assert answer == (200, {"exist": True})
        assert queue(open_controller) == 2


async def test_an_unregistration_from_another_host_is_refused(open_controller: Controller) -> None:
    """Another host cannot delete a colleague's worker: 403, and it stays."""
    async with host() as owner, host("127.0.0.2") as stranger:
        await post(owner, open_controller, "/register_worker", registration())
        code, answer = await post(
            stranger, open_controller, "/unregister_worker", {"worker_name": NAME}
        )
        assert code == 403 and answer["error"] == "forbidden"
        assert open_controller.registry.get(NAME) is not None
        removed = await post(owner, open_controller, "/unregister_worker", {"worker_name": NAME})
        assert removed == (200, {"removed": True})


async def test_a_registration_from_another_host_moves_the_ownership(
    open_controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    """A stock worker restarted elsewhere registers again: allowed, logged at WARNING, and
    from then on the old host's heartbeats are not applied."""
    async with host() as old, host("127.0.0.2") as new:
        await post(old, open_controller, "/register_worker", registration())
        with caplog.at_level(logging.WARNING, logger="controller"):
            code, _ = await post(new, open_controller, "/register_worker", registration(3))
        assert code == 200
        assert any("127.0.0.2" in r.message for r in caplog.records if r.levelname == "WARNING")
        worker = open_controller.registry.get(NAME)
        assert worker is not None and worker.owner == Owner(host="127.0.0.2")
        assert (await post(old, open_controller, "/receive_heart_beat", beat(0)))[1] == {
            "exist": False
        }
        assert queue(open_controller) == 3


async def test_ownership_ends_with_the_registration(
    open_controller: Controller, clock: FakeClock
) -> None:
    """Once the entry expired, another host registers and heartbeats as its own."""
    async with host() as old, host("127.0.0.2") as new:
        await post(old, open_controller, "/register_worker", registration())
        clock.advance(open_controller.config.heart_beat_expiration + 1)
        open_controller.expire_now()
        assert (await post(new, open_controller, "/register_worker", registration()))[0] == 200
        answer = await post(new, open_controller, "/receive_heart_beat", beat(4))
        assert answer == (200, {"exist": True})


def test_loopback_in_either_family_is_one_host_and_127_0_0_2_another() -> None:
    """::1, 127.0.0.1 and ::ffff:127.0.0.1 are one host; 127.0.0.2 is not."""
    names = {host_identity(peer_address(a)) for a in ("::1", "127.0.0.1", "::ffff:127.0.0.1")}
    assert names == {"127.0.0.1"}
    assert host_identity(peer_address("127.0.0.2")) == "127.0.0.2"
    assert host_identity(peer_address("::ffff:10.0.0.5")) == "10.0.0.5"


# -- with tokens: the principal owns the registration -------------------------------------


async def test_another_principal_changes_nothing(closed_controller: Controller) -> None:
    """With tokens, another principal's heartbeat, unregistration and re-registration all
    get 403 and the registration is untouched."""
    async with host() as http:
        assert (await post(http, closed_controller, "/register_worker", registration(1), A1))[
            0
        ] == 200
        for path, body in (
            ("/receive_heart_beat", beat(1_000_000)),
            ("/unregister_worker", {"worker_name": NAME}),
            ("/register_worker", registration(0, models=())),
        ):
            code, answer = await post(http, closed_controller, path, body, B)
            assert code == 403, path
            assert B not in str(answer)
        worker = closed_controller.registry.get(NAME)
        assert worker is not None
        assert worker.info.model_names == ("m",) and worker.queue_length == 1
        assert worker.owner == Owner(principal="gpu-a")


async def test_two_tokens_under_one_name_keep_the_ownership(closed_controller: Controller) -> None:
    """A worker whose token was rotated (same name, new token) still owns its registration."""
    async with host() as http:
        await post(http, closed_controller, "/register_worker", registration(), A1)
        answer = await post(http, closed_controller, "/receive_heart_beat", beat(2), A2)
        assert answer == (200, {"exist": True})


async def test_the_admin_token_overrides_ownership(closed_controller: Controller) -> None:
    """An admin may heartbeat and unregister a worker someone else registered."""
    async with host("127.0.0.2") as http:
        await post(http, closed_controller, "/register_worker", registration(), A1)
        answer = await post(http, closed_controller, "/receive_heart_beat", beat(5), ADMIN)
        assert answer == (200, {"exist": True})
        answer = await post(
            http, closed_controller, "/unregister_worker", {"worker_name": NAME}, ADMIN
        )
        assert answer == (200, {"removed": True})


async def test_a_principal_s_registration_refuses_trusted_hosts_without_a_token(
    run_controller: RunController,
) -> None:
    """A host trusted without a token cannot take over a registration a token made."""
    access = Access(
        worker_tokens=TOKENS.worker_tokens,
        trust_workers_from=parse_networks(["127.0.0.1"], "test"),
    )
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0, access=access)
    controller = await run_controller(config)
    async with host() as http:
        await post(http, controller, "/register_worker", registration(), A1)
        assert (await post(http, controller, "/register_worker", registration()))[0] == 403
        assert (await post(http, controller, "/receive_heart_beat", beat(1)))[0] == 403


async def test_a_refused_registration_does_not_probe_the_worker(
    closed_controller: Controller, make_worker: MakeWorker
) -> None:
    """Another principal's registration without a status is refused before the controller
    asks the worker anything."""
    worker = await make_worker()
    async with host() as http:
        await post(http, closed_controller, "/register_worker", register_body(worker), A1)
        code, _ = await post(
            http, closed_controller, "/register_worker", register_body(worker, status=False), B
        )
    assert code == 403
    assert worker.status_calls == 0


# -- the registry and what carries ownership further -------------------------------------


def test_the_rule_as_a_table() -> None:
    """Owner or admin: owner; another host over a host's entry: other source; anyone else
    over a principal's entry: forbidden; nobody's entry: anyone's."""
    a, b = Owner(principal="a"), Owner(principal="b")
    h1, h2 = Owner(host="10.0.0.1"), Owner(host="10.0.0.2")
    assert standing(a, a) is Standing.OWNER
    assert standing(a, b, admin=True) is Standing.OWNER
    assert standing(None, b) is Standing.OWNER
    assert standing(h1, h2) is Standing.OTHER_SOURCE
    assert standing(h1, a) is Standing.OTHER_SOURCE
    assert standing(a, h1) is Standing.FORBIDDEN
    assert standing(a, b) is Standing.FORBIDDEN


def test_changes_and_the_state_file_carry_the_owner_never_a_token(clock: FakeClock) -> None:
    """The change feed names the owner of each change, and a saved and loaded registry
    keeps it."""
    registry = Registry(90.0, clock)
    listener = registry.feed.subscribe()
    info = WorkerInfo(NAME, ("m",), 1.0, True)
    registry.register(info, 0, owner=Owner(principal="gpu-a"))
    registry.heartbeat(NAME, 1, owner=Owner(principal="gpu-a"))
    changes = listener.take()
    assert changes is not None
    assert [c.owner for c in changes] == [Owner(principal="gpu-a")] * 2
    (saved,) = load(dump(registry, 5000.0), 5000.0)
    assert saved.owner == Owner(principal="gpu-a")
