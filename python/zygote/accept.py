"""Accepting only what a worker can serve now: the listeners of a WSGI worker stop accepting
while all its request threads are busy.

Every worker listens on the same sockets, and the kernel hands a new connection to whichever
worker accepts first. asyncio's accept loop takes every pending connection whenever its event
loop is free, and a WSGI worker's event loop is free while its request threads compute: so a
busy worker took connections it could only answer after its current requests, while an idle
worker (a replacement that just started, one whose request ended) had nothing to do. A sync
gunicorn worker does not accept while it serves, which is why connections go to idle workers
there.

:class:`AcceptGate` does the same for uvicorn's servers: once as many requests are in flight as
the worker has request threads, it takes its listeners out of the event loop (so new
connections wait in the shared queue for another worker), and puts them back when a request
ends. :class:`OneAtATime` is the listening socket that takes one connection per turn of the
loop, so an idle worker does not take the whole queue at once before its first request has
even been read. ASGI apps serve many requests at once and are not gated.

Taking a listener out and putting it back uses asyncio's ``Server._start_serving`` (its
sockets, protocol factory and backlog are the server's own; CPython 3.9-3.13 have it); where
an asyncio lacks it, the gate logs that and stays open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

log = logging.getLogger("zygote")


class OneAtATime(socket.socket):
    """A listening socket whose ``accept`` takes one connection per turn of the event loop.

    asyncio's accept loop calls ``accept`` until it raises ``BlockingIOError``; after one
    connection this says so, and the loop (level-triggered) comes back for the next one on
    its next turn, after it has read the requests that arrived meanwhile.
    """

    _taken = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._taken:
            raise BlockingIOError
        conn = super().accept()
        self._taken = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return conn

    def _next_turn(self) -> None:
        self._taken = False


def one_at_a_time(fileno: int) -> OneAtATime:
    """The listener inherited as ``fd``, as a :class:`OneAtATime`."""
    return OneAtATime(fileno=fileno)


class AcceptGate:
    """Keeps a worker's servers from accepting while ``capacity`` requests are in flight.

    :meth:`enter` and :meth:`leave` are called on the event loop, around each request.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self.paused = False
        self._servers: list[asyncio.AbstractServer] = []

    def bind(self, servers: list[asyncio.AbstractServer]) -> None:
        """The servers to gate (uvicorn's, once it has started them). An asyncio whose
        servers cannot be started again leaves the gate open (checked here, before any
        pause, so a paused listener always comes back)."""
        if not all(hasattr(s, "_start_serving") and hasattr(s, "_serving") for s in servers):
            log.warning(
                "the accept gate stays open (this asyncio's Server has no _start_serving): "
                "busy workers accept connections too"
            )
            return
        self._servers = list(servers)

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight >= self.capacity and not self.paused:
            self._pause()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.paused and self.in_flight < self.capacity:
            self._resume()

    def _pause(self) -> None:
        if not self._servers:
            return
        loop = asyncio.get_running_loop()
        for srv in self._servers:
            for sock in srv.sockets:
                loop.remove_reader(sock.fileno())
        self.paused = True

    def _resume(self) -> None:
        self.paused = False
        for srv in self._servers:
            if not srv.sockets:
                continue  # closed: the worker is draining
            # Registers the server's sockets with its own protocol factory and backlog again.
            srv._serving = False  # type: ignore[attr-defined]
            srv._start_serving()  # type: ignore[attr-defined]
