"""The listeners of an in-replica serving replica: sockets several replicas share, uvicorn without
signal handlers on the replica's HTTP protocol (``service/hosting/http_protocol.py``: answers in
one system call, bounded clients), and client connections (HTTP keep-alive and gRPC) recycled so
replicas that join get their share."""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
from collections.abc import Iterator

import grpc
import uvicorn
from starlette.types import ASGIApp

from service.hosting.http_protocol import GuardedHttp, RefusalCounter
from service.settings import Limits

#: a client connection with nothing in progress for this long is closed: HTTP between requests
#: (uvicorn's keep-alive timeout), gRPC without a call (a GOAWAY: the channel reconnects for its
#: next call, as after a connection's age), so idle clients do not hold the connection slots
IDLE_CONNECTION_S = 30.0

#: descriptors a serving process keeps besides client connections: model files, Ray's and gRPC's
#: own sockets and pipes, the decode processes' pipes
RESERVED_DESCRIPTORS = 1024


def descriptor_room(max_connections: int) -> str | None:
    """Room for the client connections ``max_connections`` allows (HTTP and gRPC, each its own):
    this process's soft RLIMIT_NOFILE is raised as far as they need and its hard limit allows
    (Ray raises it to at most 65,536). Where the hard limit leaves too little, a warning: past it,
    a new connection fails to be accepted (EMFILE), and the client waits or sees it reset instead
    of the 503 that answers one connection too many."""
    need = 2 * max_connections + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    room = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if room > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
    if room >= need:
        return None
    return (
        f"limits.max_connections={max_connections} allows {2 * max_connections} client connections "
        f"(HTTP and gRPC), but this process may open {room} files (RLIMIT_NOFILE's hard limit): past "
        f"about {max(0, room - RESERVED_DESCRIPTORS) // 2} connections each, new ones fail instead "
        "of being answered 503. Lower ATTN_LIMITS__MAX_CONNECTIONS or raise the limit (ulimit -n, "
        "the container's nofile)"
    )


def grpc_options(limits: Limits, max_message_bytes: int, max_age_s: float) -> list[tuple[str, int]]:
    """The grpc.aio server options of a serving replica: the port shared with the node's other
    replicas (SO_REUSEPORT), the message limit both ways, and with ``max_age_s`` a GOAWAY to each
    client connection after that long (gRPC's MAX_CONNECTION_AGE, which adds ±10 % jitter). A
    gRPC channel keeps one connection for its whole life: without an age it never reaches a
    replica that joined or restarted after it connected; with one its next calls go out on a new
    connection. Calls in flight keep the old one as long as they last — no MAX_CONNECTION_AGE_GRACE:
    a KServe ``ModelStreamInfer`` stream (tritonclient's ``start_stream``) stays open for a whole
    client session, and a grace would cut it; a stopping replica drains them (``drain_s``).

    The client bounds of the HTTP listener's (:class:`GuardedHttp`), in gRPC's terms: at most
    ``max_connections`` client connections (one more is closed as it comes: its call fails
    UNAVAILABLE), each with its HTTP/2 preface and settings in within ``request_read_timeout_s``
    (gRPC's handshake timeout, 120 s by default), closed after :data:`IDLE_CONNECTION_S` to twice
    that without a call (gRPC arms its idle timer again)."""
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", round(limits.request_read_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(IDLE_CONNECTION_S * 1000)),
    ]
    if max_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(max_age_s * 1000)))
    return options


def grpc_server(
    limits: Limits,
    max_message_bytes: int,
    max_age_s: float,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> grpc.aio.Server:
    """A serving replica's grpc.aio server under :func:`grpc_options`; its calls in progress are
    bounded by ``interceptors`` (``service.api.grpc_aio.CallLimit``), which know which RPCs need
    the token: grpc's own ``maximum_concurrent_rpcs`` counts every call, so clients without the
    token held open health ``Watch`` streams until every call was refused, probes included."""
    return grpc.aio.server(
        interceptors=interceptors, options=grpc_options(limits, max_message_bytes, max_age_s)
    )


def http_config(
    app: ASGIApp,
    limits: Limits,
    counter: RefusalCounter | None = None,
    *,
    access_log: bool,
    log_level: str,
    keepalive_requests: int = 0,
    max_age_s: float = 0.0,
) -> uvicorn.Config:
    """uvicorn's configuration for a serving replica: :class:`GuardedHttp` under ``limits``,
    closing a connection after ``keepalive_requests`` or ``max_age_s`` (no WebSocket upgrade: the
    app has no such route, and an upgraded connection would leave its bounds), its own messages at
    warning only, and with ``access_log`` a line per request (client, method, path, status) at
    ``log_level``: uvicorn sets its access logger to its own level, where its INFO lines would
    never be written."""
    protocol = GuardedHttp.under(limits, counter, keepalive_requests, max_age_s)
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=access_log,
        timeout_keep_alive=round(IDLE_CONNECTION_S), proxy_headers=False, http=protocol, ws="none",
    )  # fmt: skip
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(log_level)
    return config


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process belongs to Ray."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
