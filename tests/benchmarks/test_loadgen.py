"""The load generator against a local HTTP/1.1 keep-alive server, and the report's medians."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import image_peers
from benchmarks.loadgen import Connection, Request, Result, closed_loop, open_loop, percentile
from benchmarks.report import median_row


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if b"fail" in body else 503 if b"shed" in body else 200
        extra = self.headers.get("Inference-Header-Content-Length")
        answer = json.dumps({"metrics": {"batch_size": 1}, "echo": body.decode(), "header": extra}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_closed_loop_counts_answers_and_errors(port: int) -> None:
    requests = [Request.json("/x", {"a": 1}), Request.json("/x", {"a": "fail"})]
    # one client alternates the two requests: exactly half fail
    result = asyncio.run(closed_loop("127.0.0.1", port, requests, clients=1, duration_s=10, max_requests=20))
    assert sum(result.statuses.values()) == 20 == len(result.latencies_s)
    assert result.statuses == {200: 10, 500: 10} and result.errors == 10 and result.ok == 10
    # four clients each keep to one of them (client i sends request i, i + 4, …): how many each
    # sends before the shared count runs out depends on their speed, the counts on each other not
    result = asyncio.run(
        closed_loop("127.0.0.1", port, requests, clients=4, duration_s=10, max_requests=200, keep_every=1)
    )
    assert sum(result.statuses.values()) == 200 == len(result.latencies_s)
    assert set(result.statuses) == {200, 500}
    assert result.errors == result.statuses[500] and result.ok == result.statuses[200]
    assert result.bodies and json.loads(result.bodies[0])["metrics"]["batch_size"] == 1


def test_a_client_answered_503_waits_before_its_next_request(port: int) -> None:
    """As a client that honours Retry-After: 0.2 s between sheds, so 0.5 s hold three requests."""
    shed = [Request.json("/x", {"a": "shed"})]
    result = asyncio.run(closed_loop("127.0.0.1", port, shed, clients=1, duration_s=0.5, shed_wait_s=0.2))
    assert result.statuses == {503: 3}
    assert asyncio.run(closed_loop("127.0.0.1", port, shed, clients=1, duration_s=0.5)).statuses[503] > 10


def test_a_connection_the_server_ends_is_renewed_and_one_it_keeps_is_kept(port: int) -> None:
    async def run() -> None:
        conn = await Connection.open("127.0.0.1", port)
        assert await conn.renewed() is conn
        conn.closing = True  # as after an answer with "Connection: close"
        fresh = await conn.renewed()
        assert fresh is not conn and not fresh.closing and (fresh.host, fresh.port) == ("127.0.0.1", port)
        status, _ = await fresh.send(Request.json("/x", {"a": 1}))
        fresh.close()
        assert status == 200

    asyncio.run(run())


def test_requests_carry_their_extra_headers(port: int) -> None:
    """KServe v2's binary extension needs Inference-Header-Content-Length beside the body."""
    request = Request(
        "/v2", b'{"inputs": []}tail', "application/octet-stream", (("Inference-Header-Content-Length", "14"),)
    )
    result = asyncio.run(closed_loop("127.0.0.1", port, [request], clients=2, duration_s=10, max_requests=20))
    assert result.ok == 20 and json.loads(result.bodies[0]) == {
        "metrics": {"batch_size": 1},
        "echo": '{"inputs": []}tail',
        "header": "14",
    }


def test_open_loop_keeps_its_rate(port: int) -> None:
    result = asyncio.run(open_loop("127.0.0.1", port, [Request.json("/x", {})], rate=200, duration_s=1.0))
    assert 120 <= result.ok <= 300 and result.errors == 0
    # every request's lateness against its arrival time: small while the generator keeps up
    assert (
        len(result.late_s) == result.ok and min(result.late_s) >= 0 and percentile(result.late_s, 50) < 0.05
    )


def test_open_loop_reports_how_late_requests_start_when_it_cannot_keep_up(port: int) -> None:
    """Arrivals the generator's own loop cannot start on time (here: held up on purpose) show as
    lateness, so a report can tell the generator's limit from the server's."""

    async def with_a_stall() -> Result:
        async def stall() -> None:
            await asyncio.sleep(0.1)
            time.sleep(0.3)  # the generator's loop blocked, as on a machine it shares with the server

        blocker = asyncio.create_task(stall())
        result = await open_loop("127.0.0.1", port, [Request.json("/x", {})], rate=200, duration_s=0.6)
        await blocker
        return result

    result = asyncio.run(with_a_stall())
    assert result.errors == 0 and max(result.late_s) >= 0.2


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(closed_loop("10.0.0.1", 80, [Request.json("/", {})], clients=1, duration_s=0.1))


def test_percentiles_and_medians() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2, 3, 4, 5], 99) == 5
    row = median_row([{"a": 1.0, "b": None}, {"a": 3.0, "b": None}, {"a": 2.0, "b": None}])
    assert row == {"a": 2.0, "b": None, "rounds": 3}
    # errors are every round's worst, not a median that hid one bad round (image_peers' too)
    rounds = [{"a": 1.0, "errors": 0}, {"a": 2.0, "errors": 250}, {"a": 3.0, "errors": 0}]
    assert median_row(rounds)["errors"] == 250 and image_peers.median(rounds) == {"a": 2.0, "errors": 250}
