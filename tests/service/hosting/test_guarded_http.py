"""What one client cannot do to a replica's HTTP listener (``GuardedHttp``), on real sockets
without Ray: send an endless request head (it was parsed in time growing with its square while
every other client waited), hold connections open without finishing a request (20,000 idle
sockets used up the replica's file descriptors; nothing ever closed them), or open more than the
limit — while requests that arrive in pieces, pipelined, or on a keep-alive connection that
idles between them are served as before."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from service.hosting.listening import QuietServer, http_config, shared_socket
from service.settings import Limits
from tests.conftest import free_port

TIMEOUT_S = 0.4
LIMITS = Limits(request_read_timeout_s=TIMEOUT_S, max_request_head_bytes=8192, max_connections=4)
POST = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


async def echo(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """Answers with the request body, read to its end."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def listening(limits: Limits = LIMITS) -> AsyncIterator[int]:
    """A replica's HTTP listener for :func:`echo` under ``limits``, started; → its port."""
    server = QuietServer(http_config(echo, limits, access_log=False, log_level="WARNING"))
    port = free_port()
    task = asyncio.create_task(server.serve(sockets=[shared_socket("127.0.0.1", port)]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next answer's status and body (read by its Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def refused_by(reader: asyncio.StreamReader) -> tuple[int, str, float]:
    """(status, the JSON error, when it came) of a refusal, and the connection's end after it."""
    status, body = await answer(reader)
    when = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    return status, json.loads(body)["error"], when


def test_a_request_head_over_the_limit_is_431_and_others_are_served_meanwhile() -> None:
    async def run() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
            for _ in range(64):  # 4 MiB of one header, in 64 KiB pieces
                writer.write(b"a" * 65536)
                if writer.is_closing():
                    break
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            status, error, _ = await refused_by(reader)
            assert status == 431 and "exceed the limit of 8192 bytes" in error
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(POST + b"0123456789")
            assert await answer(r2) == (200, b"0123456789")
            w2.close()

    asyncio.run(run())


def test_idle_and_slow_connections_are_answered_408_and_closed() -> None:
    async def run() -> None:
        async with listening() as port:
            start = time.monotonic()
            idle = await asyncio.open_connection("127.0.0.1", port)  # never sends a byte
            slow_head = await asyncio.open_connection("127.0.0.1", port)  # a byte every 50 ms
            stalled_body = await asyncio.open_connection("127.0.0.1", port)
            stalled_body[1].write(POST + b"01")  # 2 of its 10 bytes, then nothing

            async def dribble() -> None:
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                    if slow_head[1].is_closing():
                        return
                    slow_head[1].write(bytes([byte]))
                    await asyncio.sleep(0.05)

            dribbling = asyncio.create_task(dribble())
            results = [await refused_by(r) for r, _ in (idle, slow_head, stalled_body)]
            dribbling.cancel()
            for (status, _, when), what in zip(results, ("idle", "slow head", "stalled body"), strict=True):
                assert status == 408, what
                assert TIMEOUT_S * 0.9 <= when - start <= TIMEOUT_S + 2.5, (what, when - start)
            assert "line and headers did not arrive within 0.4 s" in results[0][1]
            assert "line and headers did not arrive within 0.4 s" in results[1][1]
            assert results[2][1] == "body: no data for 0.4 s"

    asyncio.run(run())


def test_pieces_pipelining_and_idle_keep_alive_are_served() -> None:
    """A body whose pauses are each under the timeout, however long it takes in all; two requests
    in one write; a keep-alive connection idle between requests for longer than the timeout
    (uvicorn's keep-alive timeout governs that, 30 s)."""

    async def run() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST)
            for piece in (b"01234", b"56789"):
                await asyncio.sleep(TIMEOUT_S * 0.6)  # 1.2 × the timeout in all
                writer.write(piece)
            assert await answer(reader) == (200, b"0123456789")
            writer.write(POST + b"aaaaaaaaaa" + POST + b"bbbbbbbbbb")
            assert [await answer(reader), await answer(reader)] == [(200, b"a" * 10), (200, b"b" * 10)]
            await asyncio.sleep(TIMEOUT_S * 3)
            writer.write(POST + b"0123456789")
            assert await answer(reader) == (200, b"0123456789")
            writer.close()

    asyncio.run(run())


def test_connections_beyond_the_limit_are_503_and_closed() -> None:
    async def run() -> None:
        async with listening(Limits(max_connections=4)) as port:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            extra, _ = await asyncio.open_connection("127.0.0.1", port)
            status, error, _ = await refused_by(extra)
            assert status == 503 and "holds its limit of 4" in error
            for reader, writer in held:  # those held are served
                writer.write(POST + b"0123456789")
                assert await answer(reader) == (200, b"0123456789")
            held[0][1].close()
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a place is free
            writer.write(POST + b"0123456789")
            assert await answer(reader) == (200, b"0123456789")

    asyncio.run(run())


def test_a_request_httptools_cannot_parse_is_a_json_400() -> None:
    async def run() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")  # a space in the path
            status, error, _ = await refused_by(reader)
            assert status == 400 and error == "request: not valid HTTP/1.1"

    asyncio.run(run())
