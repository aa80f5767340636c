"""A load generator that does not eat the CPU it measures: raw asyncio streams, HTTP/1.1 keep-alive.

Closed loop: N connections, each sending its next request as soon as the last answer arrived.
Open loop: requests start at Poisson arrival times at a target rate, whatever the answers do, on a
pool of connections (a request that finds no idle connection opens one). Both stop at a time or
count bound. Only loopback targets are allowed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Request:
    path: str
    body: bytes
    content_type: str = "application/json"
    #: beyond Host, Content-Type and Content-Length (KServe v2's Inference-Header-Content-Length)
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, path: str, payload: dict[str, Any]) -> Request:
        return cls(path, json.dumps(payload).encode())

    def encode(self, host: str) -> bytes:
        """The request as it goes on the wire: an HTTP/1.1 POST to ``host``."""
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self.headers)
            + "\r\n"
        ).encode()
        return head + self.body


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)  # the status of each answer, as latencies_s
    statuses: dict[int, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)  # a sample, for batch sizes
    elapsed_s: float = 0.0
    errors: int = 0  # connection failures and non-2xx answers
    retried: int = 0  # requests sent again after their connection failed (closed loop, retries > 0)
    dropped: int = 0  # requests whose connection failed (no answer), counted in errors too
    answered_at: list[float] = field(default_factory=list)  # perf_counter() of each 2xx answer
    #: open loop: how late each request started against its arrival time (this generator's own lag:
    #: large when it cannot offer the rate on the cores it shares with the server)
    late_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)


def check_host(host: str) -> None:
    if host not in ALLOWED_HOSTS:
        raise ValueError(f"load tests target loopback only, not {host!r}")


class Connection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        self.reader, self.writer, self.host, self.port = reader, writer, host, port
        self.closing = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        check_host(host)
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host, port)

    async def renewed(self) -> Connection:
        """This connection, or a new one to the same server when the server ends this one
        after its last answer (``closing``)."""
        if not self.closing:
            return self
        self.close()
        return await Connection.open(self.host, self.port)

    async def send(self, request: Request) -> tuple[int, bytes]:
        self.writer.write(request.encode(self.host))
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name.lower() == "connection" and "close" in value.lower():
                self.closing = True  # the server ends the connection after this answer
        if chunked:
            body = b""
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        self.writer.close()


def _record(result: Result, status: int, body: bytes, latency: float, keep_every: int) -> None:
    result.latencies_s.append(latency)
    result.codes.append(status)
    result.statuses[status] = result.statuses.get(status, 0) + 1
    if not 200 <= status < 300:
        result.errors += 1
        return
    result.answered_at.append(time.perf_counter())
    if len(result.latencies_s) % keep_every == 0:
        result.bodies.append(body)


async def closed_loop(host: str, port: int, requests: list[Request], clients: int, duration_s: float,
                      max_requests: int = 1_000_000, keep_every: int = 10,
                      retries: int = 0, shed_wait_s: float = 0.0) -> Result:  # fmt: skip
    """N clients on keep-alive connections. With ``retries``, a request whose connection fails
    (a replica gone) is sent again on a new connection, as an HTTP client with a retry policy
    does — safe here because inference is idempotent. With ``shed_wait_s``, a client answered
    503 waits that long before its next request, as ``Retry-After`` asks."""
    check_host(host)
    result = Result()
    deadline = time.perf_counter() + duration_s
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        conn: Connection | None = None
        try:
            n = i
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                for attempt in range(retries + 1):
                    try:
                        conn = conn or await Connection.open(host, port)
                        status, body = await conn.send(requests[n % len(requests)])
                        if conn.closing:
                            conn.close()
                            conn = None
                        break
                    except (OSError, asyncio.IncompleteReadError, ValueError):
                        if conn is not None:
                            conn.close()
                        conn = None
                        if attempt == retries:
                            result.errors += 1
                            result.dropped += 1
                        else:
                            result.retried += 1
                else:
                    await asyncio.sleep(0.01)  # nothing listening for a moment: do not spin
                    continue
                _record(result, status, body, time.perf_counter() - start, keep_every)
                n += clients
                if status == 503 and shed_wait_s:
                    await asyncio.sleep(shed_wait_s)
        finally:
            if conn is not None:
                conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    result.elapsed_s = time.perf_counter() - start
    return result


async def open_loop(host: str, port: int, requests: list[Request], rate: float, duration_s: float,
                    seed: int = 0, keep_every: int = 10) -> Result:  # fmt: skip
    """Poisson arrivals at ``rate`` per second for ``duration_s`` seconds."""
    check_host(host)
    result = Result()
    rng = random.Random(seed)
    idle: list[Connection] = []
    tasks: list[asyncio.Task] = []

    async def one(request: Request, arrival: float) -> None:
        start = time.perf_counter()
        result.late_s.append(start - arrival)
        conn = None
        try:
            conn = idle.pop() if idle else await Connection.open(host, port)
            status, body = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            result.dropped += 1
            if conn is not None:
                conn.close()
            return
        _record(result, status, body, time.perf_counter() - start, keep_every)
        if conn.closing:
            conn.close()
        else:
            idle.append(conn)

    begin = time.perf_counter()
    next_at, n = begin, 0
    while next_at < begin + duration_s:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(requests[n % len(requests)], next_at)))
        n += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - begin
    for conn in idle:
        conn.close()
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
