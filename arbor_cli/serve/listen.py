"""`arbor serve`'s socket and its HTTP connections: the bind checked before anything is announced, bounds on
slow and too many clients, and one Ctrl-C that stops the server. Imports uvicorn (only once `arbor serve`
knows it is installed).

- The address is bound here, before the model loads: a port in use or a host that does not resolve is one
  line (ArborError, exit 1), never "serving at …" followed by uvicorn's own error.
- uvicorn bounds a kept-alive connection's idle time (timeout_keep_alive) but not a request's head: a client
  that sends one header byte every few seconds holds its connection for ever. BoundedH11Protocol closes a
  connection whose request line and headers have not arrived whole HEAD_TIMEOUT_S after it opened (or after
  its previous response), and refuses connections past `max_connections` open at once. The body is bounded
  by app.BODY_TIMEOUT_S.
- uvicorn waits, on SIGINT, for open responses to end (a stream of 2,000 tokens: minutes), and its `run`
  swallows the KeyboardInterrupt (exit 0). Here SIGINT and SIGTERM cancel the running and waiting
  generations at once (each client hears its answer end), the connections get GRACE_S to close, and the
  signal is raised again afterwards: the CLI's handler turns SIGINT into "arbor: interrupted", exit 130.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from arbor_core.errors import ArborError

HEAD_TIMEOUT_S = 10.0  # a request's line and headers arrive whole within this
GRACE_S = 3  # after Ctrl-C, open connections have this long to close
DEFAULT_MAX_CONNECTIONS = 64


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening; an ArborError naming the address otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ArborError(f"cannot listen on {host}:{port}: the host does not resolve ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "the port is in use (another server?)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise ArborError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline for each request's head and a cap on open connections."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:  # this one counted: refused, closed at once
            transport.close()
            return
        self._await_head()

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no request under way: a head that never came whole

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._head_deadline is not None:  # a whole head came: its request runs
            self._head_deadline.cancel()
            self._head_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_deadline", None) is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)


class Serving(uvicorn.Server):
    """uvicorn's server whose first SIGINT or SIGTERM also calls `on_stop` (the worker's stop)."""

    def __init__(self, config: uvicorn.Config, on_stop) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.on_stop()


def serve(app, sock: socket.socket, on_stop, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
    """Run `app` on the bound `sock` until a signal; that signal is raised again once the server has stopped
    (SIGINT: KeyboardInterrupt)."""
    protocol = type("Bounded", (BoundedH11Protocol,), {"max_connections": max_connections})
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, timeout_keep_alive=5,
                            timeout_graceful_shutdown=GRACE_S, lifespan="on")
    Serving(config, on_stop).run(sockets=[sock])
