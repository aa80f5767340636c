"""What one client cannot do to a replica's HTTP listener (``GuardedHttp``), on real sockets
without Ray, on asyncio's loop and on uvloop (Ray's replicas run on it): send an endless request
head (it was parsed in time growing with its square while every other client waited), hold
connections open without finishing a request (20,000 idle sockets used up the replica's file
descriptors; nothing ever closed them), or open more than the limit — while requests that arrive
in pieces, pipelined, or on a keep-alive connection that idles between them are served as
before, and no refusal is ever written into an answer on its way."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from service.api.http import create_app
from service.hosting.http_protocol import ClientCaused, quiet_logger
from service.hosting.listening import QuietServer, http_config, shared_socket
from service.settings import Limits
from tests.conftest import free_port
from tests.service.fakes import fake_server

TIMEOUT_S = 1.0
LIMITS = Limits(request_read_timeout_s=TIMEOUT_S, max_request_head_bytes=8192, max_connections=4)
POST = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
SLOW_S = 1.5  # how long /slow takes to answer


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Runs a test's coroutine on one of the two event loops."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def on_loop(coroutine: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coroutine)

    return on_loop


async def echo(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """Answers with the request body, read to its end (``/slow``: after :data:`SLOW_S`)."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body, more = body + message.get("body", b""), message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_S)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


class Refusals:
    """The listener's refusals as the request metrics are told of them."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def refused(self, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.statuses.append(status)


REFUSALS = Refusals()


@asynccontextmanager
async def listening(limits: Limits = LIMITS, app: Any = echo, counter: Any = REFUSALS) -> AsyncIterator[int]:
    """A replica's HTTP listener for ``app`` under ``limits``, started; → its port."""
    server = QuietServer(http_config(app, limits, counter, access_log=False, log_level="WARNING"))
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
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def refused_by(reader: asyncio.StreamReader) -> tuple[int, str, float]:
    """(status, the JSON error, when it came) of a refusal, and the connection's end after it."""
    status, body = await answer(reader)
    when = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    return status, json.loads(body)["error"], when


async def served(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(POST + b"0123456789")
    assert await answer(reader) == (200, b"0123456789")
    writer.close()


def test_a_request_head_over_the_limit_is_431_and_others_are_served_meanwhile(run: Any) -> None:
    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 6000)  # under the limit so far
            await asyncio.sleep(0.1)
            await served(port)  # another client meanwhile
            for _ in range(64):  # then 4 MiB more of the same header
                if writer.is_closing():
                    break
                writer.write(b"a" * 65536)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            status, error, _ = await refused_by(reader)
            assert status == 431 and "exceed the limit of 8192 bytes" in error
            # a head over the limit that comes whole in one read: it was served
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 40_000 + b"\r\n\r\n")
            status, error, _ = await refused_by(reader)
            assert status == 431 and "exceed the limit" in error
            await served(port)

    run(main())


def test_idle_and_slow_connections_are_answered_408_and_closed(run: Any) -> None:
    REFUSALS.statuses.clear()

    async def main() -> None:
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
                assert TIMEOUT_S * 0.9 <= when - start <= TIMEOUT_S + 5, (what, when - start)
            assert "line and headers did not arrive within 1 s" in results[0][1]
            assert "line and headers did not arrive within 1 s" in results[1][1]
            assert results[2][1] == "body: no data for 1 s"

    run(main())
    # in the request metrics: the slow head; not the connection that never sent a byte (a
    # browser's preconnect), nor the stalled body (its route counts it: see below)
    assert REFUSALS.statuses == [408]


def test_bytes_before_a_request_start_its_clock(run: Any) -> None:
    """A bare CRLF after an answer (the parser skips it, and it ended uvicorn's keep-alive
    timer) held the connection for good: 4,096 such sockets would take every place."""

    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST + b"0123456789")
            assert await answer(reader) == (200, b"0123456789")
            start = time.monotonic()
            writer.write(b"\r\n")
            status, error, when = await refused_by(reader)
            assert status == 408 and "did not arrive" in error and when - start >= TIMEOUT_S * 0.9

    run(main())


def test_no_refusal_is_written_into_an_answer_on_its_way(run: Any) -> None:
    """A slow answer, then the start of a next request that stops: its 408 was written at once,
    where the client read it as the slow request's answer. It now comes after that answer. And
    garbage sent while an answer is on its way closes the connection without a word."""

    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST.replace(b"/echo", b"/slow") + b"0123456789" + b"GET /b HTT")
            assert await answer(reader) == (200, b"0123456789")  # its own answer first, whole
            status, error, _ = await refused_by(reader)
            assert status == 408 and "did not arrive" in error
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST.replace(b"/echo", b"/slow") + b"0123456789")
            await asyncio.sleep(0.2)
            writer.write(b"\x00 not http at all\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b""  # no 400 in place of the answer

    run(main())


def test_a_client_that_closes_its_side_is_taken_as_gone(run: Any) -> None:
    """The FIN of a half close (``nc -N``) is the FIN of a client that gives up: as nginx, the
    connection ends at once (its request then leaves the batch), not after the answer."""

    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST.replace(b"/echo", b"/slow") + b"0123456789")
            start = time.monotonic()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert time.monotonic() - start < SLOW_S / 2

    run(main())


def test_a_request_refused_while_its_body_comes_is_counted_once_under_its_route(
    run: Any, tmp_path: Path
) -> None:
    """Counted twice before: as the listener's 408 and, by its route, as a client gone (499)."""
    server, _, _, recorded = fake_server(tmp_path)
    counted = Refusals()

    async def main() -> None:
        async with listening(app=create_app(server), counter=counted) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/models/fake-translator/translate HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text\": ")  # fmt: skip
            status, error, _ = await refused_by(reader)
            assert status == 408 and error == "body: no data for 1 s"

    run(main())
    assert recorded.records == [("fake-translator", "translate", 408)] and counted.statuses == []


def test_a_counter_that_fails_still_ends_the_connection(run: Any) -> None:
    class Failing:
        def refused(self, status: int, seconds: float) -> None:
            raise RuntimeError("the metrics are broken")

    async def main() -> None:
        async with listening(counter=Failing()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HT")  # a head that never ends
            status, _, _ = await refused_by(reader)
            assert status == 408

    run(main())


def test_pieces_pipelining_and_idle_keep_alive_are_served(run: Any) -> None:
    """A body whose pauses are each under the timeout, however long it takes in all; two requests
    in one write; a keep-alive connection idle between requests for longer than the timeout
    (uvicorn's keep-alive timeout governs that, 30 s)."""

    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(POST)
            for piece in (b"012", b"345", b"6789"):
                await asyncio.sleep(TIMEOUT_S * 0.3)  # 0.9 × the timeout in all, 1.2 × with the head
                writer.write(piece)
            assert await answer(reader) == (200, b"0123456789")
            writer.write(POST + b"aaaaaaaaaa" + POST + b"bbbbbbbbbb")
            assert [await answer(reader), await answer(reader)] == [(200, b"a" * 10), (200, b"b" * 10)]
            await asyncio.sleep(TIMEOUT_S * 1.5)
            writer.write(POST + b"0123456789")
            assert await answer(reader) == (200, b"0123456789")
            writer.close()

    run(main())


def test_connections_beyond_the_limit_are_503_and_closed(run: Any) -> None:
    async def main() -> None:
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
            await served(port)  # a place is free

    run(main())


def test_a_request_httptools_cannot_parse_is_a_json_400(run: Any) -> None:
    async def main() -> None:
        async with listening() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")  # a space in the path
            status, error, _ = await refused_by(reader)
            assert status == 400 and error == "request: not valid HTTP/1.1"

    run(main())


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_what_a_client_sends_wrong_is_logged_once_a_minute_and_counted_always(run: Any) -> None:
    """Thirty requests that are not HTTP and ten WebSocket upgrades (each of these made uvicorn
    write two warnings) leave one line of each kind in the log, while every 400 is counted; a
    minute on, the next line tells how many were left out (``ClientCaused``)."""
    lines = Lines()

    async def main() -> None:
        async with listening() as port:
            logging.getLogger("uvicorn.error").addHandler(lines)  # after uvicorn configured its logging
            before = len(REFUSALS.statuses)
            for _ in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"\x16\x03\x01 not http\r\n\r\n")
                assert (await refused_by(reader))[0] == 400
                writer.close()
            for _ in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                )
                assert (await answer(reader))[0] == 200
                writer.close()
            assert REFUSALS.statuses[before:] == [400] * 30

    try:
        run(main())
    finally:
        logging.getLogger("uvicorn.error").removeHandler(lines)
    assert [line[:30] for line in lines.lines] == [
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "No supported WebSocket library",
    ], lines.lines


def test_client_caused_lines_pass_again_after_the_interval_with_the_count_left_out() -> None:
    now = [0.0]
    thinned = ClientCaused(60.0, clock=lambda: now[0])

    def passes(message: str, level: int = logging.WARNING) -> str | None:
        record = logging.LogRecord("uvicorn.error", level, __file__, 1, message, None, None)
        return record.getMessage() if thinned.filter(record) else None

    assert passes("Invalid HTTP request received.") == "Invalid HTTP request received."
    for _ in range(5):
        now[0] += 1
        assert passes("Invalid HTTP request received.") is None
    assert passes("Exception in ASGI application\n") == "Exception in ASGI application\n"  # not thinned
    assert passes("Unsupported upgrade request.") == "Unsupported upgrade request."
    now[0] = 61.0
    assert passes("Invalid HTTP request received.") == (
        "Invalid HTTP request received. (and 5 more in the 61 s before this one)"
    )
    assert passes("Invalid HTTP request received.") is None


def test_the_quiet_logger_follows_uvicorns_level_as_it_changes() -> None:
    """Its records reach ``uvicorn.error``'s handlers at that logger's level, also when the level
    changes after the first record (a logger outside logging's registry kept its first answer)."""
    parent, lines = logging.getLogger("uvicorn.error"), Lines()
    level = parent.level
    parent.addHandler(lines)
    try:
        quiet = quiet_logger()
        parent.setLevel(logging.WARNING)
        quiet.warning("Unsupported upgrade request.")
        parent.setLevel(logging.ERROR)
        quiet.warning("Invalid HTTP request received.")
        quiet.error("Exception in ASGI application")
    finally:
        parent.removeHandler(lines)
        parent.setLevel(level)
    assert lines.lines == ["Unsupported upgrade request.", "Exception in ASGI application"]
