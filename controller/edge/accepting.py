"""The standalone controller's listening sockets, whose new connections are let in a few
per turn of the event loop, taking turns between source addresses.

``loop.create_server`` accepts the connections waiting in the kernel's queue in one
callback (uvloop's every one of them, asyncio's up to the backlog): 256 clients connecting
at once were one 15 ms callback
(about 60 µs each: the descriptor, the transport, aiohttp's protocol), during which no
other client was read or answered. Here each listening socket is watched with
``add_reader``, and at most ``ACCEPTS_PER_TURN`` connections are let in per turn: made a
transport and its protocol through ``loop.connect_accepted_socket`` (with the TLS
handshake, for a TLS listener), as ``create_server`` would have made them.

The kernel's queue is first come, first served: a client connecting behind a thousand
connections of one flooding address waited for all of them, 125 turns (50-90 ms in the
hostile benchmark's status fan-out). So up to ``TAKES_PER_TURN`` connections a turn are
taken from it (``accept()`` alone, about 10 µs each) into a line per source address, and
the connections let in each turn are drawn from those lines in turn, one from each: a
newcomer from another address is let in within a turn or two of being taken, however long
the flood's line. The lines hold no more than the room the caller says is left (the
controller's: ``--max-connections`` less the connections it holds), so the descriptors
they take are within the caps' (but a turn's ``ACCEPTS_PER_TURN`` are always taken: at
the cap, letting one in is what makes room, by closing an idle one); beyond that the
kernel's queue (``--backlog`` deep) keeps them.

Binding follows ``create_server``: every address ``getaddrinfo`` gives for the host (all
interfaces for none), ``SO_REUSEADDR``, IPv6 sockets IPv6-only, the port chosen by the
system for each when 0 is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..pacing import Lines

__all__ = ["ACCEPTS_PER_TURN", "ACCEPT_RETRY_DELAY", "MAX_TAKEN", "TAKES_PER_TURN", "Listener"]

log = logging.getLogger(__name__)

#: connections let in per turn of the loop: a burst of 256 is 32 turns of about half a
#: millisecond each instead of one of 15 ms
ACCEPTS_PER_TURN = 8
#: connections taken from one listening socket's queue per turn, into the lines per address
TAKES_PER_TURN = 32
#: the room in the lines of a listener whose caller does not say
MAX_TAKEN = 4096
#: how long accepting pauses when the process is out of descriptors or memory (seconds),
#: as asyncio's own servers do, instead of spinning on a socket that stays readable
ACCEPT_RETRY_DELAY = 1.0
#: errors of accept() that mean "the process or system is out of a resource"
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Listening sockets for ``protocol_factory``'s connections (see the module's text).

    :meth:`open` binds and starts accepting; :meth:`close` stops accepting and drops the
    connections accepted but not yet made into transports (waiting in a line, or their TLS
    handshake under way).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
        per_turn: int = ACCEPTS_PER_TURN,
        room: Callable[[], int] = lambda: MAX_TAKEN,
    ) -> None:
        self.loop = loop
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout if ssl_context is not None else None
        self.per_turn = per_turn
        #: how many connections may wait in the lines now
        self._room = room
        self.sockets: list[socket.socket] = []
        #: connections taken, not yet let in: a line per source address, in the order the
        #: addresses take their turns (one whose turn came goes to the back)
        self._lines: Lines[socket.socket] = Lines()
        self.taken = 0
        #: the next turn's letting in, when some are still waiting
        self._letting: asyncio.Handle | None = None
        #: connections between being let in and their protocol's connection_made
        self._starting: dict[asyncio.Task[None], socket.socket] = {}
        self._paused: asyncio.TimerHandle | None = None

    async def open(self, host: str | None, port: int, backlog: int) -> None:
        """Bind to every address of ``host`` (all interfaces for ``None``) and listen."""
        try:  # a literal address (or none: all interfaces) needs no resolver
            infos = socket.getaddrinfo(
                host or None,
                port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST,
            )
        except socket.gaierror:  # a host name: resolved off the loop
            infos = await self.loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError:  # a family this system cannot open (IPv6 turned off)
                    continue
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as e:
                    reason = (e.strerror or str(e)).lower()
                    message = f"error while attempting to bind on address {address!r}: {reason}"
                    raise OSError(e.errno, message) from None
                sock.listen(backlog)
                sock.setblocking(False)
            if not self.sockets:
                raise OSError(f"no address to listen on for host {host!r}")
        except BaseException:
            self._close_sockets()
            raise
        self._watch()

    def close(self) -> None:
        """Stop accepting: the sockets are closed, connections not yet made are dropped."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        self._close_sockets()
        if self._letting is not None:
            self._letting.cancel()
            self._letting = None
        lines, self._lines, self.taken = self._lines, Lines(), 0
        for line in lines.values():
            for conn in line:
                conn.close()
        for task in list(self._starting):
            task.cancel()

    # -- accepting ---------------------------------------------------------------------------

    def _watch(self) -> None:
        self._paused = None
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(ValueError, OSError):  # never watched, or closed
                self.loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        """The listening socket is readable: take up to ``TAKES_PER_TURN`` connections into
        their addresses' lines, then let this turn's in (unless a turn's letting in is
        already due: it comes next)."""
        room = max(self.per_turn, self._room())
        for _ in range(TAKES_PER_TURN):
            if self.taken >= room:
                break  # the rest wait in the kernel's queue
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                break  # none left: the next burst wakes this again
            except ConnectionAbortedError:
                continue  # gone before it was taken
            except OSError as e:
                if e.errno in _EXHAUSTED:
                    self._pause(e)
                else:  # the socket itself failed: nothing a retry would mend now
                    log.error("accepting a connection failed: %s", e)
                break
            conn.setblocking(False)
            self._lines.add(address[0], conn)
            self.taken += 1
        if self._letting is None:
            self._let_in()

    def _let_in(self) -> None:
        """Let in up to ``per_turn`` connections, one from each address's line in turn; the
        next turn lets in more while any wait."""
        self._letting = None
        for _ in range(self.per_turn):
            if not self._lines:
                return
            conn = self._lines.take()  # its address's line to the back
            self.taken -= 1
            task = self.loop.create_task(self._make(conn))
            self._starting[task] = conn
            task.add_done_callback(self._started)
        if self._lines:
            self._letting = self.loop.call_soon(self._let_in)

    def _started(self, task: asyncio.Task[None]) -> None:
        conn = self._starting.pop(task)
        if task.cancelled():  # perhaps before it began: _make did not close it then
            conn.close()

    def _pause(self, error: OSError) -> None:
        """Out of descriptors or memory: stop accepting for a moment (the kernel keeps the
        waiting connections queued), then look again."""
        log.error(
            "accepting connections paused for %g s: %s (descriptor limit or memory reached)",
            ACCEPT_RETRY_DELAY,
            error.strerror or error,
        )
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
        self._paused = self.loop.call_later(ACCEPT_RETRY_DELAY, self._watch)

    async def _make(self, conn: socket.socket) -> None:
        """Make a transport and protocol of an accepted connection (its TLS handshake
        first, for a TLS listener); a connection that fails meanwhile is just closed."""
        try:
            await self.loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, ssl.SSLError, TimeoutError) as e:
            # A client that went away or failed its handshake: its business, not an error.
            log.debug("a new connection failed before its first byte: %s", e)
            conn.close()
        except Exception:  # a bug: said once, and the connection closed, the server goes on
            log.exception("making a transport of a new connection failed")
            conn.close()
