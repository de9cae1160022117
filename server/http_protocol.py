"""The HTTP/1.1 connection: uvicorn's h11 protocol with the guards a public server needs.

- **Request head timeout** (``request_head_timeout_seconds``): a connection that has not sent a
  complete request head that long after it opened, or after its previous response, is closed:
  silently when it sent nothing (an idle keep-alive connection, a port scan), with a 408 when it
  sent part of one (slowloris).
- **Connection cap** (``max_connections``, by default below the open-file limit): a connection past
  it closes the oldest idle one (no request in progress); when none is idle it gets a 503 and is
  closed. So idle sockets can never use up the file descriptors the server needs to accept
  ``/health`` or a request.
- **Write timeout** (``write_timeout_seconds``): a client that keeps the send buffer full (above
  its high-water mark) that long, a stream nobody reads, is disconnected; its requests are aborted
  as for any disconnect.
- **HTTP framing**: a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused with
  a 400 and the connection closed (RFC 9112, section 6.3: otherwise the bytes after the chunked body
  would be read as a second request, which a proxy trusting Content-Length would not have seen).
- Every rejection at this level (malformed request, oversized head, the cases above) that can still
  be answered gets OpenAI's JSON error shape and ``Connection: close``; the connection then reads
  and discards what the client still sends for a moment before closing, so the client reads the
  answer rather than a reset.

``AcceptErrorLog`` makes the event loop report ``accept()`` failures (out of file descriptors) once
per interval with a count, instead of a traceback per failed call.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import struct
from http import HTTPStatus
from typing import Callable

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body
from .middleware import REQUEST_ID_HEADER, new_request_id

logger = logging.getLogger("server")

# After an error answer, how long a connection keeps reading (and discarding) before it closes.
LINGER_SECONDS = 2.0
# Raise the soft open-file limit up to this (or the hard limit, if lower) at start-up.
FILE_LIMIT_TARGET = 65536


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (at most ``FILE_LIMIT_TARGET``); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FILE_LIMIT_TARGET if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return FILE_LIMIT_TARGET if soft == resource.RLIM_INFINITY else soft


def file_reserve(file_limit: int) -> int:
    """Descriptors kept for everything but client connections (model files, logs, the engine)."""
    return max(64, file_limit // 8)


# The kernel's queue of connections waiting to be accepted (uvicorn's default).
LISTEN_BACKLOG = 2048


def accept_burst(file_limit: int) -> int:
    """How many connections the event loop may accept in one go, before any of them can be closed
    (asyncio takes it from the ``backlog`` it is given): a fraction of the reserve, so a burst past
    the connection cap cannot use up the descriptors. ``relisten`` then restores the kernel's queue."""
    return min(LISTEN_BACKLOG, max(8, file_reserve(file_limit) // 4))


def relisten(sockets) -> None:
    """Give listening sockets the kernel queue ``LISTEN_BACKLOG`` (asyncio set it to the accept burst:
    a short queue drops connections, which then wait a second for the client's SYN retry)."""
    for ts in sockets:
        with socket.fromfd(ts.fileno(), ts.family, ts.type) as sock:  # a dup: the listener stays open
            sock.listen(LISTEN_BACKLOG)


def connection_cap(configured: int | None, file_limit: int) -> int:
    """The connection cap: ``configured`` if set, else the file limit less ``file_reserve``."""
    room = max(1, file_limit - file_reserve(file_limit))
    if configured is None:
        return room
    if configured > room:
        logger.warning("max_connections=%d leaves fewer than %d of the %d open files for the rest of the server: "
                       "accept() may fail under load", configured, file_reserve(file_limit), file_limit)
    return configured


class ConnectionGuard:
    """What the server's connections share: the limits, the idle connections oldest first, and a
    counter for the rejections (``on_reject(status)``, the app's error metric)."""

    def __init__(self, head_timeout: float, write_timeout: float, max_connections: int | None,
                 on_reject: Callable[[int], None] | None = None):
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.on_reject = on_reject
        self.idle: dict["GuardedH11Protocol", None] = {}  # insertion order: the oldest idle first

    def rejected(self, status: int) -> None:
        if self.on_reject is not None:
            self.on_reject(status)


class StrictConnection(h11.Connection):
    """h11's server side, refusing a request head larger than ``max_head`` bytes however it arrived
    (h11 itself checks only a head still incomplete), and a request with both Content-Length and
    Transfer-Encoding; keeps the last protocol error for the answer."""

    last_error: h11.RemoteProtocolError | None = None

    def __init__(self, max_head: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head

    def next_event(self):
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > self.max_head:
                    raise h11.RemoteProtocolError("request head too large", 431)
                names = {name for name, _ in event.headers}  # h11 lower-cases header names
                if b"transfer-encoding" in names and b"content-length" in names:
                    raise h11.RemoteProtocolError(
                        "A request must not have both Content-Length and Transfer-Encoding (RFC 9112, section 6.3).", 400)
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise
        return event


def error_response_bytes(status: int, message: str, code: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 error response with OpenAI's error body, a new X-Request-Id (the request's
    head may be unreadable, so a client's id is not echoed) and ``Connection: close``."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps(error_body(message, type_, None, code)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{REQUEST_ID_HEADER.decode()}: {new_request_id()}\r\n"
            f"connection: close\r\n{extra_headers}\r\n")
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guards of this module (``guard`` is set by ``protocol_class``)."""

    guard: ConnectionGuard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        max_size = self.config.h11_max_incomplete_event_size
        self.conn = StrictConnection(DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if max_size is None else max_size)
        self._head_timer = None
        self._write_timer = None
        self._linger_timer = None
        self._rejected = False  # answered with an error: what still arrives is discarded

    def _unsupported_upgrade_warning(self) -> None:
        """An Upgrade request (WebSocket, h2c) is answered as the plain HTTP request it is (no WebSocket
        route, ``ws="none"``): nothing to warn of, nor a WebSocket library to advise."""

    # -- state ------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _update(self) -> None:
        """Idle (waiting for a request head): listed as idle, head timer armed. Busy: neither."""
        if self._rejected or self.transport is None or self.transport.is_closing():
            self._forget()
            return
        if self._busy():
            self.guard.idle.pop(self, None)
            self._cancel_head_timer()
        else:
            if self not in self.guard.idle:
                self.guard.idle[self] = None
            if self._head_timer is None and self.guard.head_timeout > 0:
                self._head_timer = self.loop.call_later(self.guard.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _forget(self) -> None:
        self.guard.idle.pop(self, None)
        self._cancel_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        cap = self.guard.max_connections
        if cap is not None and len(self.connections) > cap:
            oldest = next((c for c in self.guard.idle if c is not self), None)
            if oldest is None:
                self._refuse_at_capacity()
                return
            oldest.close_idle()
        self._update()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # lingering after an error answer: read and drop
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def connection_lost(self, exc) -> None:
        self._forget()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.guard.write_timeout > 0 and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.guard.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- the guards ---------------------------------------------------------------------------------
    def close_idle(self) -> None:
        """Close this idle connection at once (to make room for a new one)."""
        self._forget()
        self.connections.discard(self)  # no longer counted against the cap (the transport closes next)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._busy() or self._rejected or self.transport.is_closing():
            return
        received, _ = self.conn.trailing_data
        if not received:
            self.close_idle()
            return
        self._reject(408, f"No complete request head within {self.guard.head_timeout:g} seconds "
                          "(setting request_head_timeout_seconds).", "request_timeout")

    def _write_timed_out(self) -> None:
        self._write_timer = None
        client = "%s:%d" % self.client if self.client else "a client"
        logger.warning("closing the connection of %s: its response stayed unread (send buffer full) for %gs "
                       "(setting write_timeout_seconds)", client, self.guard.write_timeout)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, so the kernel drops the unsent data at once rather than retrying it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _refuse_at_capacity(self) -> None:
        self._rejected = True
        self.guard.rejected(503)
        self.transport.write(error_response_bytes(
            503, f"The server has {self.guard.max_connections} open connections, all busy (setting max_connections). "
                 "Retry later.", "too_many_connections", "retry-after: 1\r\n"))
        self.connections.discard(self)
        self.transport.close()  # at once: a flood of connections must not hold descriptors

    def _reject(self, status: int, message: str, code: str) -> None:
        """Answer an error this protocol found (not the app), then linger and close."""
        if self._rejected:
            return
        self._rejected = True
        self._forget()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # too late for an answer
                self.transport.close()
                return
            cycle.disconnected = True  # the app's request ends here; what it would send is dropped
            cycle.message_event.set()
        self.guard.rejected(status)
        self.transport.write(error_response_bytes(status, message, code))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a malformed request
        exc = self.conn.last_error
        status = getattr(exc, "error_status_hint", 400) or 400
        if status == 431:
            self._reject(431, f"The request head (request line and headers) is larger than {self.conn.max_head} bytes.",
                         "request_header_too_large")
        else:
            detail = str(exc)[:200] if exc is not None else msg
            self._reject(status if 400 <= status < 500 else 400, f"Invalid HTTP request: {detail}",
                         "invalid_http_request")


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds every connection with (``uvicorn.Config(http=...)``)."""
    return type("ServerProtocol", (GuardedH11Protocol,), {"guard": guard})


class AcceptErrorLog:
    """An event-loop exception handler that reports ``accept()`` failures (out of descriptors) once per
    ``interval`` seconds with their count, and passes everything else on."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, loop, interval: float = 10.0, note: str = ""):
        self.loop = loop
        self.interval = interval
        self.note = note
        self.previous = loop.get_exception_handler()
        self.count = 0
        self.next_report = 0.0

    def __call__(self, loop, context) -> None:
        if context.get("message") != self.MESSAGE:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        now = loop.time()
        if now >= self.next_report:
            logger.error("cannot accept connections: %s (%d failed accept() call(s) since the last report; "
                         "reported at most every %gs)%s", context.get("exception"), self.count, self.interval, self.note)
            self.count = 0
            self.next_report = now + self.interval
