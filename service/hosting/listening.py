"""The listeners of an in-replica serving replica: sockets several replicas share, uvicorn without
signal handlers, answers written in one system call, and keep-alive connections recycled so
replicas that join get their share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ConnectionRecycler:
    """Close a keep-alive connection after ``limit`` requests (``Connection: close``), as nginx's
    ``keepalive_requests`` does: replicas share the port per *connection*, so without this a
    replica that restarts or joins would get no share of long-lived client connections."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.served: OrderedDict[Any, int] = OrderedDict()  # client address → requests so far

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        client = scope.get("client")
        count = self.served.pop(client, 0) + 1
        last = count >= self.limit
        if not last:
            self.served[client] = count
            while len(self.served) > 65536:  # addresses of connections that went away
                self.served.popitem(last=False)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if last else send)


def http_config(app: ASGIApp, *, access_log: bool, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for a serving replica: its own messages at warning only, and with
    ``access_log`` a line per request (client, method, path, status) at ``log_level``: uvicorn sets
    its access logger to its own level, where its INFO lines would never be written."""
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=access_log,
        timeout_keep_alive=30, proxy_headers=False, http=CorkedHttp,
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
