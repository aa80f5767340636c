"""The in-replica listeners (``service/hosting/listening.py``) on real sockets, without Ray: an
answer leaves in one system call (uvicorn writes headers and body separately), streamed events
still leave as they are written, a closing answer is whole before the connection ends, and
client connections are recycled: HTTP keep-alive after so many requests or so long, gRPC after
so long without cutting a stream, gRPC clients bounded (connections, their preface and idle
time). What a client cannot do to a replica's HTTP listener (head
size, slow or idle connections, too many of them) is in ``test_guarded_http.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import uvicorn

from service.hosting import listening
from service.hosting.http_protocol import CorkedHttp
from service.hosting.listening import (
    QuietServer,
    grpc_server,
    http_config,
    shared_socket,
)
from service.settings import Limits
from tests.conftest import free_port

WRITES: list[bytes] = []  # what reached the socket's transport, one item per send()


class Counted(CorkedHttp):
    """The protocol the replica runs, with each write to the real transport recorded."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        real = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            WRITES.append(bytes(data))
            real(data)

        transport.write = write  # type: ignore[method-assign]
        super().connection_made(transport)


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    headers = [(b"content-length", b"5")]
    if scope["path"] == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


@contextlib.asynccontextmanager
async def connected(
    config: uvicorn.Config,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A replica's HTTP server (``QuietServer`` on a ``shared_socket``) with ``config``, started,
    and one client connection to it; the connection closed and the server stopped after."""
    server = QuietServer(config)
    port = free_port()
    task = asyncio.create_task(server.serve(sockets=[shared_socket("127.0.0.1", port)]))
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        server.should_exit = True
        await task


async def exchange() -> list[tuple[str, list[bytes], bytes]]:
    """Each path in turn on one keep-alive connection → (path, the writes its answer took, what
    the client read)."""
    seen = []
    config = uvicorn.Config(app, http=Counted, log_level="warning", lifespan="off")
    async with connected(config) as (reader, writer):
        for path in ("/a", "/b", "/stream", "/c", "/close"):
            WRITES.clear()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b"chunked" in head:
                body = await reader.readuntil(b"0\r\n\r\n")
            else:
                body = await reader.readexactly(5)
            await asyncio.sleep(0.05)
            seen.append((path, list(WRITES), head + body))
        assert await reader.read() == b""  # /close closed the connection, after its answer
    return seen


def test_an_answer_leaves_in_one_write_and_stream_events_as_written() -> None:
    answers = asyncio.run(exchange())
    for path, writes, read in answers:
        assert b"".join(writes) == read, path  # nothing lost, nothing reordered
        if path == "/stream":
            # the headers with the first event; each later event, and the end, when written
            assert len(writes) == 4 and writes[0].startswith(b"HTTP/1.1 200") and b"data: 0" in writes[0]
            assert [w.count(b"data:") for w in writes] == [1, 1, 1, 0]
        else:
            assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"hello")


def test_the_access_log_writes_a_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    """ATTN_ACCESS_LOG: uvicorn's access lines reach its logger (uvicorn would set it to the
    replica's quiet level, warning, and drop them), and with it off there are none."""

    async def one_request(config: uvicorn.Config) -> None:
        async with connected(config) as (reader, writer):
            writer.write(b"GET /logged HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"hello")

    access = logging.getLogger("uvicorn.access")
    for access_log in (True, False):
        config = http_config(app, Limits(), access_log=access_log, log_level="INFO")  # configures the loggers
        caplog.clear()
        access.addHandler(caplog.handler)  # uvicorn's logger does not propagate
        try:
            asyncio.run(one_request(config))
        finally:
            access.removeHandler(caplog.handler)
        lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
        assert (lines and "GET /logged" in lines[0] and "200" in lines[0]) if access_log else not lines


async def recycled(limit: int, max_age_s: float, gaps_s: list[float]) -> tuple[list[bool], bool]:
    """Requests on one keep-alive connection to ``app`` on a replica's listener (:func:`http_config`)
    closing connections after ``limit`` requests or ``max_age_s``, each after its gap → (whether
    each answer said ``Connection: close``, whether the server then ended the connection); the
    requests stop at the first closing answer."""
    closing: list[bool] = []
    config = http_config(
        app, Limits(), access_log=False, log_level="INFO", keepalive_requests=limit, max_age_s=max_age_s
    )
    async with connected(config) as (reader, writer):
        for gap in gaps_s:
            await asyncio.sleep(gap)
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(5) == b"hello"
            closing.append(b"connection: close" in head.lower())
            assert head.lower().count(b"connection:") <= 1  # one header, whoever writes it
            if closing[-1]:
                break
        ended = await asyncio.wait_for(reader.read(), 1) == b"" if closing[-1] else False
    return closing, ended


def test_keep_alive_connections_are_recycled_by_count_and_by_age() -> None:
    """ATTN_KEEPALIVE_REQUESTS and ATTN_CONNECTION_MAX_AGE_S: the answer that reaches either limit
    says so and the connection ends after it; 0 turns a limit off."""
    assert asyncio.run(recycled(3, 0, [0] * 5)) == ([False, False, True], True)
    # a slow client: 0.5 s on, its next answer closes, whatever its count
    assert asyncio.run(recycled(100, 0.5, [0, 0.3, 0.3, 0.3])) == ([False, False, True], True)
    assert asyncio.run(recycled(0, 0, [0, 0.2, 0.2, 0.2])) == ([False] * 4, False)


@contextlib.asynccontextmanager
async def peer_and_echo(server: grpc.aio.Server) -> AsyncIterator[tuple[int, set[str]]]:
    """``server`` with a unary method ``Peer`` (adds the client's address to the set) and a
    stream ``Echo``, started; → (its port, the addresses)."""
    peers: set[str] = set()

    async def peer(_: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.add(context.peer())
        return b""

    async def echo(messages: Any, _: grpc.aio.ServicerContext) -> Any:
        async for message in messages:
            yield message

    handlers = {
        "Peer": grpc.unary_unary_rpc_method_handler(peer),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, peers
    finally:
        await server.stop(None)


async def across_ages(max_age_s: float, seconds: float) -> tuple[set[str], list[bytes]]:
    """A gRPC server as a serving replica builds it (``grpc_server``), and one channel that
    calls a unary method every 20 ms while one bidirectional stream on it sends a message every
    100 ms, both for ``seconds`` → (the client addresses the server saw, the stream's echoes)."""
    async with (
        peer_and_echo(grpc_server(Limits(), 1 << 22, max_age_s)) as (port, peers),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        end = asyncio.get_running_loop().time() + seconds

        async def sent() -> Any:
            i = 0
            while asyncio.get_running_loop().time() < end:
                yield b"%d" % i
                i += 1
                await asyncio.sleep(0.1)

        async def stream() -> list[bytes]:
            return [m async for m in channel.stream_stream("/t.T/Echo")(sent())]

        async def unary() -> None:
            while asyncio.get_running_loop().time() < end:
                await channel.unary_unary("/t.T/Peer")(b"", timeout=5)
                await asyncio.sleep(0.02)

        echoes, _ = await asyncio.gather(stream(), unary())
    return peers, echoes


def test_grpc_connections_are_recycled_by_age_and_streams_outlive_it() -> None:
    """ATTN_CONNECTION_MAX_AGE_S over gRPC: after the age the channel's next calls go out on new
    connections (the server sees new client ports), while a stream open across many ages goes on
    to its end — a MAX_CONNECTION_AGE_GRACE would have closed the connection under it (it cut
    a KServe ModelStreamInfer stream, which tritonclient keeps open for a session). No call fails."""
    peers, echoes = asyncio.run(across_ages(0.3, 2.0))
    assert echoes == [b"%d" % i for i in range(len(echoes))] and len(echoes) >= 15, echoes
    assert len(peers) >= 3, peers  # ≈ 6 ages: several connections
    peers, _ = asyncio.run(across_ages(0, 1.0))
    assert len(peers) == 1, peers  # 0: one connection for the channel's life


def channel_of(port: int) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels in one process share them by default)."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def test_grpc_client_connections_are_bounded_in_number_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_connections`` over gRPC: one connection more is closed as it comes (its call fails
    UNAVAILABLE) and gets in once another leaves; a connection that never sends gRPC's preface is
    closed after ``request_read_timeout_s``; an idle one after ``IDLE_CONNECTION_S``, and its
    channel's next call goes out on a new connection without failing."""
    monkeypatch.setattr(listening, "IDLE_CONNECTION_S", 1.0)

    async def scenario() -> None:
        limits = Limits(max_connections=2, request_read_timeout_s=0.5)
        async with peer_and_echo(grpc_server(limits, 1 << 22, 0)) as (port, peers):
            # silent: the server's settings come at once, then its GOAWAY and the close
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = loop.time()
            received = await asyncio.wait_for(reader.read(), 5)
            assert b"handshake timeout" in received and 0.4 < loop.time() - started < 2, received
            writer.close()

            first, second, third = channel_of(port), channel_of(port), channel_of(port)
            await first.unary_unary("/t.T/Peer")(b"", timeout=5)
            await second.unary_unary("/t.T/Peer")(b"", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await third.unary_unary("/t.T/Peer")(b"", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await second.close()
            await third.unary_unary("/t.T/Peer")(b"", timeout=10, wait_for_ready=True)
            assert len(peers) == 3, peers

            # idle past the limit: the server closed both; the next calls connect again
            await asyncio.sleep(3.0)
            await first.unary_unary("/t.T/Peer")(b"", timeout=5)
            await third.unary_unary("/t.T/Peer")(b"", timeout=5)
            assert len(peers) == 5, peers
            await first.close()
            await third.close()

    asyncio.run(scenario())


DESCRIPTORS = """
import resource, sys
from service.hosting.listening import descriptor_room
soft, hard, connections = (int(a) for a in sys.argv[1:])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(descriptor_room(connections))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("soft", "hard", "connections", "raised", "warned"),
    [
        (512, 8192, 1000, 3024, False),  # 2 × 1000 + 1024 reserved, under the hard limit: raised
        (256, 2048, 1000, 2048, True),  # the hard limit is short: raised to it, and said
        (8192, 8192, 10, 8192, False),  # room already: untouched
    ],
)
def test_a_replica_makes_room_for_the_connections_it_allows_or_says_it_cannot(
    soft: int, hard: int, connections: int, raised: int, warned: bool
) -> None:
    """Past the process's RLIMIT_NOFILE a new connection is not accepted at all (EMFILE), so the
    503 that answers one connection too many never comes: the replica raises its soft limit for
    ``limits.max_connections`` (HTTP and gRPC) before it listens, or warns, naming the setting."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8192:
        pytest.skip("this process's hard RLIMIT_NOFILE is under 8192")
    run = subprocess.run(
        [sys.executable, "-c", DESCRIPTORS, str(soft), str(hard), str(connections)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    message, limit = run.stdout.strip().splitlines()
    assert int(limit) == raised
    if warned:
        assert "ATTN_LIMITS__MAX_CONNECTIONS" in message and "about 512 connections each" in message
    else:
        assert message == "None"
