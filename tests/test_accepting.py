"""New connections are taken a few per turn of the event loop (controller/edge/accepting.py):
a burst of clients connecting at once cannot hold the loop while every one of them is
made a transport and a protocol, and everyone is still let in.

Like tests/test_hostile_pacing.py, these run on uvloop, the production loop, whose own
``create_server`` took every waiting connection in one callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controller import ControllerConfig
from controller.edge import accepting
from controller.edge.accepting import ACCEPTS_PER_TURN, Listener
from controller.edge.client_connections import _Client
from controller.server import Controller

from .conftest import ask_test_connection, wait_until
from .test_hostile_pacing import Turns, on_uvloop

BURST = 120


def connect_now(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections to ``port`` from ``source`` made at once, blocking: the kernel
    completes each handshake into the listening socket's queue while the loop (this one)
    does nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        sockets.append(sock)
    return sockets


def port_of(controller: Controller) -> int:
    return int(controller.url.rsplit(":", 1)[1])


def held(controller: Controller) -> int:
    clients = controller.client_connections
    assert clients is not None
    return clients.held


def test_a_burst_of_new_connections_is_taken_a_few_per_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """120 clients connecting at once are let in at most ACCEPTS_PER_TURN per turn of the
    loop (uvloop's own server took all of them in one callback, 15 ms for 256), and each
    is answered."""
    made: Counter[int] = Counter()
    turns = Turns()
    connection_made = _Client.connection_made

    def counted(self: _Client, transport: asyncio.BaseTransport) -> None:
        made[turns.count] += 1
        connection_made(self, transport)

    monkeypatch.setattr(_Client, "connection_made", counted)

    async def scenario() -> None:
        config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
        async with Controller.serve(config) as controller:
            with turns:
                sockets = connect_now(port_of(controller), BURST)
                try:
                    await wait_until(lambda: held(controller) == BURST, timeout=10)
                    answers = await asyncio.gather(*(ask_test_connection(s) for s in sockets))
                finally:
                    for sock in sockets:
                        sock.close()
        assert sum(made.values()) == BURST
        assert max(made.values()) <= ACCEPTS_PER_TURN, made
        # spread over that many turns (before, all were made in the same one)
        assert len(made) > 1 and len(made) >= BURST // ACCEPTS_PER_TURN, made
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)

    on_uvloop(scenario)


def test_a_client_already_in_is_answered_before_a_burst_is_all_let_in() -> None:
    """A client with a connection open asks while 120 new clients are waiting to be let in:
    its answer comes while most of them are still waiting (before, the whole burst was
    taken in first, in one callback)."""

    async def scenario() -> None:
        config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
        async with Controller.serve(config) as controller:
            port = port_of(controller)
            [first] = connect_now(port, 1)
            try:
                await wait_until(lambda: held(controller) == 1)
                burst = connect_now(port, BURST)
                try:
                    answer = await ask_test_connection(first)
                    held_at_answer = held(controller)
                    await wait_until(lambda: held(controller) == 1 + BURST, timeout=10)
                finally:
                    for sock in burst:
                        sock.close()
            finally:
                first.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert held_at_answer < 1 + BURST // 2, held_at_answer

    on_uvloop(scenario)


def test_a_newcomer_from_another_address_is_let_in_ahead_of_a_flood_from_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """120 connections from one address wait to be let in when a client from another
    connects behind them: it is let in before most of the flood, and everyone is
    answered. (The kernel's queue is first come, first served: before, it was let in
    after all 120.)"""
    sources: list[str] = []
    connection_made = _Client.connection_made

    def noted(self: _Client, transport: asyncio.BaseTransport) -> None:
        sources.append(transport.get_extra_info("peername")[0])
        connection_made(self, transport)

    monkeypatch.setattr(_Client, "connection_made", noted)

    async def scenario() -> None:
        config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
        async with Controller.serve(config) as controller:
            port = port_of(controller)
            flood = connect_now(port, BURST, source="127.0.0.3")
            [newcomer] = connect_now(port, 1, source="127.0.0.2")
            clients = [newcomer, *flood]
            try:
                answers = await asyncio.gather(*(ask_test_connection(s) for s in clients))
            finally:
                for sock in clients:
                    sock.close()
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)

    on_uvloop(scenario)
    assert sorted(sources) == ["127.0.0.2"] + ["127.0.0.3"] * BURST
    assert sources.index("127.0.0.2") < BURST // 3, sources.index("127.0.0.2")


class Counting(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.made += 1


@contextlib.asynccontextmanager
async def listening(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    """A Listener for ``factory`` on a loopback port (yielded), closed at the end."""
    listener = Listener(asyncio.get_running_loop(), factory)
    await listener.open("127.0.0.1", 0, 16)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


async def one_let_in(port: int) -> None:
    """One client connects to ``port``; returns once its protocol has been made."""
    Counting.made = 0
    [client] = connect_now(port, 1)
    try:
        await wait_until(lambda: Counting.made == 1)
    finally:
        client.close()


def test_the_lines_hold_no_more_than_the_room_the_caller_gives() -> None:
    """A listener told that 10 connections fit never has more than 10 taken and waiting to
    be let in (the rest wait in the kernel's queue), and lets all 100 in."""

    async def scenario() -> None:
        Counting.made = 0
        listener = Listener(asyncio.get_running_loop(), Counting, room=lambda: 10)
        await listener.open("127.0.0.1", 0, 256)
        clients = connect_now(listener.sockets[0].getsockname()[1], 100)
        most = 0
        try:
            async with asyncio.timeout(10):  # only ends a failing run
                while Counting.made < 100:
                    most = max(most, listener.taken)
                    await asyncio.sleep(0)
        finally:
            listener.close()
            for sock in clients:
                sock.close()
        assert 0 < most <= 10, most

    on_uvloop(scenario)


def test_closing_a_listener_closes_the_connections_waiting_to_be_let_in() -> None:
    """Connections taken but not yet let in when the listener closes are closed: their
    clients read the end, none is let in afterwards."""

    async def scenario() -> None:
        Counting.made = 0
        listener = Listener(asyncio.get_running_loop(), Counting, per_turn=1)
        await listener.open("127.0.0.1", 0, 256)
        clients = connect_now(listener.sockets[0].getsockname()[1], 20)
        try:
            while not listener.taken:  # the turn they are taken in, 1 let in a turn after
                await asyncio.sleep(0)
            listener.close()
            made = Counting.made
            loop = asyncio.get_running_loop()
            for sock in clients[made:]:
                sock.setblocking(False)
                async with asyncio.timeout(5):  # only ends a failing run
                    with contextlib.suppress(ConnectionResetError):
                        assert await loop.sock_recv(sock, 1) == b""
            assert listener.taken == 0 and Counting.made == made < 20
        finally:
            for sock in clients:
                sock.close()

    on_uvloop(scenario)


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When accept() fails for want of descriptors (EMFILE), the listener stops looking at
    its socket (which stays readable: without the pause it would be retried every turn)
    and says so; after ACCEPT_RETRY_DELAY it looks again and lets the waiting client in."""
    monkeypatch.setattr(accepting, "ACCEPT_RETRY_DELAY", 0.2)
    calls: list[str] = []
    real_accept = socket.socket.accept

    def accept(self: socket.socket) -> Any:
        if not calls:
            calls.append("EMFILE")
            raise OSError(errno.EMFILE, "Too many open files")
        calls.append("accepted")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    Counting.made = 0

    async def scenario() -> None:
        async with listening(Counting) as port:
            [client] = connect_now(port, 1)
            try:
                await wait_until(lambda: bool(calls))
                for _ in range(50):  # fifty turns with the socket readable
                    await asyncio.sleep(0)
                assert calls == ["EMFILE"]
                await wait_until(lambda: Counting.made == 1)
            finally:
                client.close()

    with caplog.at_level(logging.ERROR, logger="controller.edge.accepting"):
        on_uvloop(scenario)
    assert calls[:2] == ["EMFILE", "accepted"]
    assert "accepting connections paused for 0.2 s: Too many open files" in caplog.text


def test_binding_a_port_in_use_names_the_address_and_closes_what_it_opened() -> None:
    """A port another socket holds: OSError naming the address, as create_server said."""

    async def scenario() -> None:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        listener = Listener(asyncio.get_running_loop(), Counting)
        try:
            with pytest.raises(OSError, match=rf"127\.0\.0\.1', {port}\).*in use"):
                await listener.open("127.0.0.1", port, 16)
        finally:
            holder.close()
        assert listener.sockets == []

    on_uvloop(scenario)


def test_a_connection_whose_protocol_fails_to_be_made_is_closed_and_the_next_let_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A protocol factory that raises (a bug) costs that one connection: it is closed (its
    client reads the end), the error is logged once, and the next connection is let in."""
    made: list[int] = []

    def factory() -> asyncio.Protocol:
        made.append(len(made))
        if len(made) == 1:
            raise RuntimeError("broken factory")
        return Counting()

    async def scenario() -> None:
        async with listening(factory) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(5):  # only ends a failing run
                assert await reader.read() == b""  # closed by the controller
            writer.close()
            await one_let_in(port)

    with caplog.at_level(logging.ERROR, logger="controller.edge.accepting"):
        on_uvloop(scenario)
    assert len(made) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["making a transport of a new connection failed"]
