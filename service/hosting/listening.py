"""The listeners of an in-replica serving replica: sockets several replicas share, uvicorn without
signal handlers, answers written in one system call, and client connections (HTTP keep-alive and
gRPC) recycled so replicas that join get their share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Limits


class ConnectionRecycler:
    """Close a keep-alive connection (``Connection: close`` on an answer) after ``limit`` requests,
    as nginx's ``keepalive_requests`` does, or on its first answer ``max_age_s`` after its first
    request, as nginx's ``keepalive_time`` does (0: no such limit): replicas share the port per
    *connection*, so without this a replica that restarts or joins would get no share of
    long-lived client connections — the age bounds how long that takes whatever a client's rate."""

    def __init__(self, app: ASGIApp, limit: int, max_age_s: float = 0.0) -> None:
        self.app, self.limit, self.max_age_s = app, limit, max_age_s
        #: client address → (requests so far, when its first one came)
        self.served: OrderedDict[Any, tuple[int, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self.limit or self.max_age_s):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        now = time.monotonic()
        count, first = self.served.pop(client, (0, now))
        count += 1
        last = (0 < self.limit <= count) or (0 < self.max_age_s <= now - first)
        if not last:
            self.served[client] = (count, first)
            while len(self.served) > 65536:  # addresses of connections that went away
                self.served.popitem(last=False)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if last else send)


def grpc_options(max_message_bytes: int, max_age_s: float) -> list[tuple[str, int]]:
    """The grpc.aio server options of a serving replica: the port shared with the node's other
    replicas (SO_REUSEPORT), the message limit both ways, and with ``max_age_s`` a GOAWAY to each
    client connection after that long (gRPC's MAX_CONNECTION_AGE, which adds ±10 % jitter). A
    gRPC channel keeps one connection for its whole life: without an age it never reaches a
    replica that joined or restarted after it connected; with one its next calls go out on a new
    connection. Calls in flight keep the old one as long as they last — no MAX_CONNECTION_AGE_GRACE:
    a KServe ``ModelStreamInfer`` stream (tritonclient's ``start_stream``) stays open for a whole
    client session, and a grace would cut it; a stopping replica drains them (``drain_s``)."""
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if max_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(max_age_s * 1000)))
    return options


def http_config(app: ASGIApp, limits: Limits, *, access_log: bool, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for a serving replica: :class:`GuardedHttp` under ``limits``, its
    own messages at warning only, and with ``access_log`` a line per request (client, method,
    path, status) at ``log_level``: uvicorn sets its access logger to its own level, where its
    INFO lines would never be written."""
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=access_log,
        timeout_keep_alive=30, proxy_headers=False, http=GuardedHttp.under(limits),
    )  # fmt: skip
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(log_level)
    return config


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process belongs to Ray."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CorkedHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) whose writes made in one event-loop callback leave
    in one system call. uvicorn writes a response's status line and headers as soon as the app
    sends ``http.response.start`` and the body when it sends the body: two ``send()`` calls, two
    TCP segments (the socket has ``TCP_NODELAY``) and two wake-ups of the client for every answer,
    although the app sends both in the same step. A streamed answer's headers leave with its first
    event the same way; later events each leave when they are written."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Corked(transport))  # type: ignore[arg-type]


#: how long a refused connection's further input is read and dropped before it closes
LINGER_S = 2.0


class GuardedHttp(CorkedHttp):
    """:class:`CorkedHttp` with what a server facing clients needs and uvicorn's httptools
    protocol lacks (measured: a 100 MB header took 11.6 s to parse, in time that grows with its
    square, while other clients waited; 20,000 idle sockets used up the replica's file
    descriptors, and nothing ever closed them):

    - a request's line and headers are at most ``max_request_head_bytes`` (431, as nginx's
      ``large_client_header_buffers``); the parser is never fed much more than that of one head;
    - they must be in within ``request_read_timeout_s`` of the request's first byte — of the
      connection, for its first request — and a body may pause that long at most (408, as
      nginx's ``client_header_timeout`` and ``client_body_timeout``); an idle keep-alive
      connection between requests is uvicorn's ``timeout_keep_alive``'s;
    - at most ``max_connections`` connections are open; one more is answered 503 and closed;
    - a request httptools cannot parse is answered 400 in JSON like every error, not text.

    A request that arrives in one piece, as nearly all do, starts no timer."""

    limits: ClassVar[Limits]

    @classmethod
    def under(cls, limits: Limits) -> type[GuardedHttp]:
        """The protocol class uvicorn instantiates per connection, under ``limits``."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True  # no request line and headers complete since the last message
        self._begun = False  # a request begun and not complete
        self._head_since: float | None = self.loop.time()  # the first request's: from the connection
        self._last_data = self._head_since
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        if len(self.connections) > self.limits.max_connections:
            limit = self.limits.max_connections
            self._refuse(503, f"connections: this replica holds its limit of {limit}; retry", linger=False)
            return
        self._arm(self.limits.request_read_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered already: the rest is read and dropped until the close
            return
        if self._in_head:
            self._head_bytes += len(data)
        self._last_data = self.loop.time()
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_request_head_bytes:
            limit = self.limits.max_request_head_bytes
            self._refuse(431, f"request: its line and headers exceed the limit of {limit} bytes")
        elif self._begun and self._timer is None:
            self._arm(self.limits.request_read_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._head_since is None:
            self._head_since = self._last_data  # the data it began in came then

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_since = False, 0, None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._begun = True, False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "request: not valid HTTP/1.1")

    def _arm(self, delay: float) -> None:
        if not self._refused:  # a refused connection has its closing timer
            self._timer = self.loop.call_later(delay, self._check_reading)

    def _check_reading(self) -> None:
        """The timer: refuse a request that is too slow in coming, or look again when it may be."""
        self._timer = None
        timeout, now = self.limits.request_read_timeout_s, self.loop.time()
        if self._in_head and self._head_since is not None:  # a head on its way (or awaited)
            left = self._head_since + timeout - now
            if left <= 0:
                self._refuse(408, f"request: its line and headers did not arrive within {timeout:g} s")
                return
        elif self._begun:  # a body on its way
            left = timeout if self.flow.read_paused else self._last_data + timeout - now
            if left <= 0:  # closed without a word where the app has answered already
                answered = self.cycle is not None and self.cycle.response_started
                self._refuse(408, f"body: no data for {timeout:g} s", answer=not answered)
                return
        else:
            return  # between requests: uvicorn's keep-alive timeout
        self._arm(left)

    def _refuse(self, status: int, message: str, answer: bool = True, linger: bool = True) -> None:
        """Answer ``status`` with a JSON error (if ``answer``) and end the connection. With
        ``linger``, as nginx's lingering close: our side ends at once, and what the client still
        sends is read and dropped for up to :data:`LINGER_S` before the socket closes — closed
        with unread data, the kernel would reset the connection, and a client still sending its
        headers or body would get the reset instead of the answer."""
        if self._refused:
            return
        self._refused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if answer:
            body = orjson.dumps({"error": message})
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


class _Corked:
    """A transport whose writes wait for the end of the current event-loop callback and then go
    out joined; everything else is the transport's own. ``close`` writes what waits first."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket other replicas on this node may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
