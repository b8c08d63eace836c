"""The rest of a refused body is dropped at the pace of everyone's reads
(edge/client_connections.py, controller/edge/fair_reads.py): clients still sending bodies
the controller refused cannot make every turn of the loop copy megabytes.

Runs on uvloop, the production loop, which reads a readable socket up to 32 times in a
row (256 KiB each) before it looks at anything else.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from controller import ControllerConfig
from controller.edge.client_connections import _Client
from controller.server import Controller

from .conftest import wait_until
from .test_hostile_pacing import Turns, on_uvloop

MIB = 1 << 20
SENDERS = 4
#: what each sender sends past the 1 MiB limit
REST = 12 * MIB


def test_refused_bodies_still_arriving_are_dropped_a_share_per_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four clients send 13 MiB bodies at once past a 1 MiB limit: each gets its 413 once
    it has sent everything, and no turn of the loop reads more than 1 MiB of what they
    send after their refusal (before, up to 8 MiB per client per turn)."""
    turns = Turns()
    dropped: Counter[int] = Counter()
    received = _Client.data_received

    def counted(self: _Client, data: bytes) -> None:
        if self.discarding:
            dropped[turns.count] += len(data)
        received(self, data)

    monkeypatch.setattr(_Client, "data_received", counted)

    async def send(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = MIB + REST
        writer.write(b"POST /worker_generate_stream HTTP/1.1\r\nHost: c\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % size)
        piece = b"x" * MIB
        for _ in range(size // MIB):
            writer.write(piece)
            await writer.drain()
        answer = await reader.read(4096)
        writer.close()
        return answer

    async def scenario() -> None:
        config = ControllerConfig(host="127.0.0.1", port=0, max_body_size=MIB)
        async with Controller.serve(config) as controller:
            port = int(controller.url.rsplit(":", 1)[1])
            clients = controller.client_connections
            assert clients is not None
            with turns:
                answers = await asyncio.gather(*(send(port) for _ in range(SENDERS)))
                # what the kernel still held of the bodies is read (and dropped) before
                # the controller closes each connection
                await wait_until(lambda: clients.held == 0, timeout=20)
        assert all(a.startswith(b"HTTP/1.1 413") for a in answers)

    on_uvloop(scenario)
    assert sum(dropped.values()) > REST  # most of what was sent came after the refusal
    assert max(dropped.values()) <= MIB, max(dropped.values())
