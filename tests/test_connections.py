"""Client connections of a standalone controller: a head, a body and a keep-alive wait are
bounded in time, and connections are bounded in number, in all (the oldest idle one makes
room) and from one source address (issue 16)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller import Controller, ControllerConfig
from controller.cli import build_parser, load_config
from controller.edge.client_connections import TIME_UPS_PER_TURN, ClientConnections
from controller.edge.listening import Caps, fit_to_descriptors

from .conftest import (
    MakeWorker,
    RunController,
    SpawnController,
    register,
    split_stream,
    wait_until,
)
from .test_hostile_pacing import Turns

#: every wait on the network is bounded by this, so a broken limit fails instead of hanging
BOUND = 10.0

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")


def config(**limits: Any) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, **limits)


def held(controller: Controller) -> int:
    """Client connections the standalone ``controller`` holds now."""
    clients = controller.client_connections
    assert clients is not None
    return clients.held


def port_of(controller: Controller) -> int:
    return int(controller.url.rsplit(":", 1)[1])


@pytest.fixture
async def sockets() -> AsyncIterator[list[Conn]]:
    """Raw connections made by a test, closed after it."""
    opened: list[Conn] = []
    yield opened
    for _, writer in opened:
        writer.close()


async def connect(controller: Controller, opened: list[Conn], source: str = "127.0.0.1") -> Conn:
    """A raw connection to ``controller`` from ``source`` (any 127.x address is loopback)."""
    conn = await asyncio.open_connection("127.0.0.1", port_of(controller), local_addr=(source, 0))
    opened.append(conn)
    return conn


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the controller sends until it closes the connection (a reset counts as
    a close); fails if it stays open for ``BOUND`` seconds."""
    async with asyncio.timeout(BOUND):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer read off a raw connection: status, headers (lower-case), body."""
    async with asyncio.timeout(BOUND):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def ask(conn: Conn, path: str = "/test_connection") -> int:
    """Send a kept-alive GET on a raw connection; the answer's status."""
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: controller\r\n\r\n".encode())
    await writer.drain()
    status, _, _ = await answer(reader)
    return status


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a connection per request, so that no kept-alive connection of
    its own is closed under it by the limits being tested."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def stream_messages(client: aiohttp.ClientSession, controller: Controller) -> list[Any]:
    async with client.post(f"{controller.url}/worker_generate_stream", json={"model": "m"}) as r:
        assert r.status == 200
        return split_stream(await r.read())


# -- time bounds ---------------------------------------------------------------------------


SLOW_HEAD = (
    b"POST /get_worker_address HTTP/1.1\r\nHost: controller\r\n"
    b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
)


async def trickle_head(conn: Conn) -> tuple[int, bytes]:
    """Send :data:`SLOW_HEAD` a byte every 50 ms (the attacker's pace) until the controller
    closes the connection; how many bytes went out, and what came back."""
    reader, writer = conn
    end = asyncio.ensure_future(closed(reader))
    sent = 0
    while not end.done() and sent < len(SLOW_HEAD):
        try:
            writer.write(SLOW_HEAD[sent : sent + 1])
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.wait([end], timeout=0.05)
    return sent, await end


async def test_a_head_sent_a_byte_at_a_time_is_closed_when_the_whole_head_is_late(
    run_controller: RunController, sockets: list[Conn]
) -> None:
    """Slowloris: a head trickling in one byte every 50 ms (each gap well inside the 0.3 s
    --header-timeout) is closed without an answer before it is complete: the timeout
    counts the whole head, not the gaps between bytes."""
    controller = await run_controller(config(header_timeout=0.3))
    sent, received = await trickle_head(await connect(controller, sockets))
    assert received == b""
    assert sent < len(SLOW_HEAD)


async def test_the_next_head_on_a_kept_alive_connection_has_the_header_timeout_too(
    run_controller: RunController, sockets: list[Conn]
) -> None:
    """After a request, a kept-alive connection that trickles its next head is closed
    --header-timeout (0.3 s) after that head began, not after --idle-timeout (30 s)."""
    controller = await run_controller(config(header_timeout=0.3))
    conn = await connect(controller, sockets)
    assert await ask(conn) == 200
    sent, received = await trickle_head(conn)
    assert received == b""
    assert sent < len(SLOW_HEAD)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    run_controller: RunController, sockets: list[Conn]
) -> None:
    """A connection that never sends a byte is closed once --header-timeout has passed."""
    controller = await run_controller(config(header_timeout=0.3))
    reader, _ = await connect(controller, sockets)
    assert await closed(reader) == b""
    await wait_until(lambda: held(controller) == 0, BOUND)


async def test_connections_whose_time_is_up_together_are_closed_a_few_per_turn(
    run_controller: RunController, sockets: list[Conn], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty connections that send nothing all pass --header-timeout while the loop is
    busy: every one is closed, at most TIME_UPS_PER_TURN in one turn of the loop (200
    slow clients timed out together held the loop 23 ms in the hostile benchmark), and a
    client on another connection is answered meanwhile."""
    closes: list[int] = []
    close = ClientConnections.close_client

    def counted(self: ClientConnections, client: Any) -> None:
        closes.append(turns.count)
        close(self, client)

    monkeypatch.setattr(ClientConnections, "close_client", counted)
    controller = await run_controller(config(header_timeout=0.3))
    patient = await connect(controller, sockets)
    assert await ask(patient) == 200
    readers = [(await connect(controller, sockets))[0] for _ in range(40)]
    await wait_until(lambda: held(controller) == 41, BOUND)
    turns = Turns()
    with turns:
        time.sleep(0.4)  # the loop busy elsewhere: every deadline passes meanwhile
        asking = asyncio.ensure_future(ask(patient))
        assert await asyncio.gather(*(closed(r) for r in readers)) == [b""] * 40
        assert await asking == 200
    per_turn = Counter(closes)
    assert len(closes) == 40 and max(per_turn.values()) <= TIME_UPS_PER_TURN
    assert len(per_turn) >= 40 // TIME_UPS_PER_TURN


async def test_a_body_that_trickles_in_gets_408_and_the_connection_closes(
    run_controller: RunController, sockets: list[Conn]
) -> None:
    """A body arriving a byte every 50 ms (it would take 10 s) gets HTTP 408 naming
    --body-timeout once 0.3 s have passed since its head, then the connection closes."""
    controller = await run_controller(config(body_timeout=0.3))
    reader, writer = await connect(controller, sockets)
    writer.write(
        b"POST /get_worker_address HTTP/1.1\r\nHost: controller\r\n"
        b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"
    )

    async def trickle() -> None:
        try:
            for _ in range(199):
                await asyncio.sleep(0.05)  # the attacker's pace
                writer.write(b" ")
                await writer.drain()
        except ConnectionError:
            pass

    trickling = asyncio.ensure_future(trickle())
    try:
        status, headers, body = await answer(reader)
    finally:
        trickling.cancel()
    assert status == 408
    assert headers["connection"].lower() == "close"
    refusal = json.loads(body)
    assert refusal["error"] == "request_timeout"
    assert "body_timeout" in refusal["message"]
    assert await closed(reader) == b""


async def test_an_idle_connection_is_closed_while_a_stream_on_another_goes_on(
    run_controller: RunController,
    make_worker: MakeWorker,
    client: aiohttp.ClientSession,
    sockets: list[Conn],
) -> None:
    """With --idle-timeout 0.3, a kept-alive connection waiting for its next request is
    closed, while a stream held up mid-way for longer on another connection is not: it
    completes once its worker goes on."""
    worker = await make_worker(tokens=3, hang_after=1)
    controller = await run_controller(config(idle_timeout=0.3))
    await register(client, controller, worker)
    streaming = asyncio.ensure_future(stream_messages(client, controller))
    await asyncio.wait_for(worker.stream_started.wait(), BOUND)
    idle = await connect(controller, sockets)
    assert await ask(idle) == 200
    assert await closed(idle[0]) == b""
    assert not streaming.done()
    worker.release.set()
    messages = await asyncio.wait_for(streaming, BOUND)
    assert [m["error_code"] for m in messages] == [0, 0, 0]
    assert messages[-1]["text"] == "tok0 tok1 tok2"


# -- how many connections ------------------------------------------------------------------


async def test_at_the_cap_the_oldest_idle_connection_makes_room_for_a_new_client(
    run_controller: RunController, client: aiohttp.ClientSession, sockets: list[Conn]
) -> None:
    """With --max-connections 20 and 20 kept-alive connections idle, a new client is
    served; the connection idle the longest was closed for it, and the 19 others still
    answer."""
    controller = await run_controller(config(max_connections=20))
    idle = []
    for _ in range(20):
        conn = await connect(controller, sockets)
        assert await ask(conn) == 200
        idle.append(conn)
    async with client.get(f"{controller.url}/test_connection") as r:
        assert r.status == 200
    assert await closed(idle[0][0]) == b""
    for conn in idle[1:]:
        assert await ask(conn) == 200


async def test_connections_with_a_request_in_progress_are_never_closed_to_make_room(
    run_controller: RunController,
    make_worker: MakeWorker,
    client: aiohttp.ClientSession,
    sockets: list[Conn],
) -> None:
    """With --max-connections 3 and three streams in progress, a new client is refused
    with HTTP 503 (it says why) and the three streams complete untouched."""
    worker = await make_worker(tokens=3, hang_after=1)
    controller = await run_controller(config(max_connections=3))
    await register(client, controller, worker)
    streams = [asyncio.ensure_future(stream_messages(client, controller)) for _ in range(3)]
    await wait_until(lambda: worker.active == 3, BOUND)
    await wait_until(lambda: held(controller) == 3, BOUND)
    reader, _ = await connect(controller, sockets)
    status, headers, body = await answer(reader)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error"] == "too_many_connections"
    assert "max_connections" in json.loads(body)["message"]
    assert await closed(reader) == b""
    worker.release.set()
    for messages in await asyncio.wait_for(asyncio.gather(*streams), BOUND):
        assert messages[-1] == {"text": "tok0 tok1 tok2", "error_code": 0}


async def test_one_source_past_its_cap_is_refused_while_another_is_served(
    run_controller: RunController, sockets: list[Conn]
) -> None:
    """With --max-connections-per-source 4, a fifth connection from 127.0.0.1 is refused
    with HTTP 503, while a client connecting from 127.0.0.2 is served and the four held
    connections still answer."""
    controller = await run_controller(config(max_connections_per_source=4))
    held = [await connect(controller, sockets) for _ in range(4)]
    reader, _ = await connect(controller, sockets)
    status, _, body = await answer(reader)
    assert status == 503
    assert "max_connections_per_source" in json.loads(body)["message"]
    assert await closed(reader) == b""
    other = await connect(controller, sockets, source="127.0.0.2")
    assert await ask(other) == 200
    for conn in held:
        assert await ask(conn) == 200


async def test_a_tls_handshake_that_never_comes_is_closed_after_the_header_timeout(
    run_controller: RunController, sockets: list[Conn], certificate: tuple[Any, Any]
) -> None:
    """Over TLS, a connection that never starts its handshake is closed after
    --header-timeout (the handshake comes before the head), and counts for nothing."""
    key, cert = certificate
    controller = await run_controller(
        config(header_timeout=0.3, ssl_keyfile=str(key), ssl_certfile=str(cert))
    )
    reader, _ = await connect(controller, sockets)
    assert await closed(reader) == b""
    assert held(controller) == 0


def test_caps_that_the_descriptor_limit_cannot_hold_shrink_in_proportion() -> None:
    """Caps that fit the descriptor limit stay as asked; caps that do not shrink in
    proportion until they fit with 64 descriptors to spare, and the warning names the
    limit, the flags and the values used."""
    assert fit_to_descriptors(4096, 1024, 100_000) == Caps(4096, 1024)
    assert fit_to_descriptors(4096, 1024, None) == Caps(4096, 1024)
    caps = fit_to_descriptors(4096, 1024, 1024)
    assert caps.max_connections + caps.max_worker_connections + 64 <= 1024
    assert caps.max_connections == 768 and caps.max_worker_connections == 192
    assert caps.warning is not None
    for text in ("1024", "--max-connections 4096", "--max-worker-connections 1024", "768"):
        assert text in caps.warning


@needs_prlimit
async def test_more_idle_sockets_than_descriptors_do_not_lock_new_clients_out(
    spawn_controller: SpawnController, sockets: list[Conn]
) -> None:
    """The idle-socket attack (1,100 idle sockets at a limit of 1,024), scaled down: a
    controller that may open only 300 descriptors says it runs with smaller caps, and with
    350 idle connections opened against it (from three addresses, each under its
    per-source cap) a client from a fourth address is still served."""
    controller = await spawn_controller(prefix=("prlimit", "--nofile=300:300", "--"))
    assert any("cannot hold --max-connections 4096" in line for line in controller.lines)
    host, port = controller.url.removeprefix("http://").rsplit(":", 1)
    for i in range(350):
        local = (f"127.0.0.{1 + i % 3}", 0)
        sockets.append(await asyncio.open_connection(host, int(port), local_addr=local))
    other = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.9", 0))
    sockets.append(other)
    assert await ask(other) == 200
    # The ones idle longest were closed to make room.
    assert await closed(sockets[0][0]) == b""


# -- the flags -----------------------------------------------------------------------------


def test_the_connection_flags_default_as_the_issue_says_and_read_their_variables() -> None:
    """Defaults 10 s, 60 s, 30 s, 4096, 256 and 1024; each flag is also read from
    FC_CONTROLLER_<FLAG>, and a flag on the command line wins."""
    default, _ = load_config([], {})
    assert (default.header_timeout, default.body_timeout, default.idle_timeout) == (10, 60, 30)
    assert (default.max_connections, default.max_connections_per_source) == (4096, 256)
    assert default.max_worker_connections == 1024
    environ = {
        "FC_CONTROLLER_HEADER_TIMEOUT": "9",
        "FC_CONTROLLER_BODY_TIMEOUT": "7.5",
        "FC_CONTROLLER_IDLE_TIMEOUT": "3",
        "FC_CONTROLLER_MAX_CONNECTIONS": "100",
        "FC_CONTROLLER_MAX_CONNECTIONS_PER_SOURCE": "10",
        "FC_CONTROLLER_MAX_WORKER_CONNECTIONS": "64",
    }
    given, _ = load_config(["--header-timeout", "2.5"], environ)
    assert (given.header_timeout, given.body_timeout, given.idle_timeout) == (2.5, 7.5, 3)
    assert (given.max_connections, given.max_connections_per_source) == (100, 10)
    assert given.max_worker_connections == 64


def test_help_shows_each_connection_limit_s_default() -> None:
    """--help shows the default of every connection limit in the flag's own text."""
    helps = {o: a.help or "" for a in build_parser()._actions for o in a.option_strings}
    for flag, default in [
        ("--header-timeout", "10"),
        ("--body-timeout", "60"),
        ("--idle-timeout", "30"),
        ("--max-connections", "4096"),
        ("--max-connections-per-source", "256"),
        ("--max-worker-connections", "1024"),
    ]:
        assert helps[flag].endswith(f"(default: {default})"), flag
