"""The HTTP/1.1 protocol of an in-replica serving replica: uvicorn's httptools protocol with its
writes corked (:class:`CorkedHttp`) and the bounds a server facing clients needs
(:class:`GuardedHttp`: request heads, slow and idle clients, connections per replica)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, ClassVar, Protocol

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.server import REFUSED_WITH
from service.settings import Limits

log = logging.getLogger("ray.serve")


class CorkedHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) whose writes made in one event-loop callback leave
    in one system call. uvicorn writes a response's status line and headers as soon as the app
    sends ``http.response.start`` and the body when it sends the body: two ``send()`` calls, two
    TCP segments (the socket has ``TCP_NODELAY``) and two wake-ups of the client for every answer,
    although the app sends both in the same step. A streamed answer's headers leave with its first
    event the same way; later events each leave when they are written."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Corked(transport))  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client closed its side: ours closes after what waits corked is written (asyncio
        would close the socket under it, and an answer made in the same pass was lost). A client
        that only half-closes (``nc -N``) is taken as gone, as nginx takes it: the same FIN is
        how a client that gives up closes, and its request must leave the batch."""
        self.transport.close()
        return None


#: how long a refused connection's further input is read and dropped before it closes
LINGER_S = 2.0
#: the same for a connection refused because the replica holds its limit of them
LINGER_OVER_LIMIT_S = 0.2


#: uvicorn's warnings that any client causes at will, one per request (a line that is not HTTP;
#: a WebSocket upgrade, which this listener does not take, costs two)
CLIENT_CAUSED = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library",
)
#: of each, at most one line this often; the request metrics count every refusal
CLIENT_CAUSED_EVERY_S = 60.0


class ClientCaused(logging.Filter):
    """Lets one of each :data:`CLIENT_CAUSED` warning through per ``every_s``, telling how many
    were left out since the last; everything else passes. Without it a client sending garbage in
    a loop wrote a warning per request into the replica's log."""

    def __init__(
        self, every_s: float = CLIENT_CAUSED_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(CLIENT_CAUSED):
            return True
        now, key = self.clock(), record.msg
        last = self._last.get(key, -math.inf)
        if now - last < self.every_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            record.msg = f"{record.msg} (and {left_out} more in the {now - last:.0f} s before this one)"
        return True


def quiet_logger(every_s: float = CLIENT_CAUSED_EVERY_S) -> logging.Logger:
    """uvicorn's ``uvicorn.error`` for a listener's connections, :class:`ClientCaused` warnings
    thinned: its child ``uvicorn.error.clients``, whose records go to the parent's handlers at the
    parent's level, with a new filter (one per process: the last listener built sets it)."""
    logger = logging.getLogger("uvicorn.error.clients")
    for old in [f for f in logger.filters if isinstance(f, ClientCaused)]:
        logger.removeFilter(old)
    logger.addFilter(ClientCaused(every_s))
    return logger


class RefusalCounter(Protocol):
    def refused(self, status: int, seconds: float) -> None:
        """A connection refused with ``status``, ``seconds`` after it was made."""


class GuardedHttp(CorkedHttp):
    """:class:`CorkedHttp` with what a server facing clients needs and uvicorn's httptools
    protocol lacks (measured: a 100 MB header took 11.6 s to parse, in time that grows with its
    square, while other clients waited; 20,000 idle sockets used up the replica's file
    descriptors, and nothing ever closed them):

    - a request's line and headers are at most ``max_request_head_bytes`` (431, as nginx's
      ``large_client_header_buffers``); the parser is never fed much more than that of one head;
    - they must be in within ``request_read_timeout_s`` of the request's first byte — of the
      connection, for its first request; of a stray byte before a request (a bare CRLF, which
      the parser skips) — and a body may pause that long at most (408, as nginx's
      ``client_header_timeout`` and ``client_body_timeout``); an idle keep-alive connection
      between requests is uvicorn's ``timeout_keep_alive``'s;
    - at most ``max_connections`` connections are open; one more is answered 503 and closed;
    - a request httptools cannot parse is answered 400 in JSON like every error, not text, and
      logged once a minute at most (:class:`ClientCaused`), as a WebSocket upgrade is;
    - a keep-alive connection is closed (``Connection: close`` on the answer) after
      ``keepalive_requests`` requests, as nginx's ``keepalive_requests``, or with its first answer
      ``max_age_s`` after its first request, as nginx's ``keepalive_time`` (0: no such limit):
      replicas share the port per *connection*, so without this a replica that restarts or joins
      would get no share of long-lived client connections — the age bounds how long that takes
      whatever a client's rate.

    A refusal is never written into an answer on its way (a slow answer, pipelined ones): for
    the next request's head the connection waits until they are out, or closes without a word.
    Each connection has one timer until its first request is in; later, a request that arrives
    in one piece, as nearly all do, starts none."""

    limits: ClassVar[Limits]
    #: told of each refusal (the request metrics count them)
    counter: ClassVar[RefusalCounter | None] = None
    #: uvicorn's logger for the connections, warnings a client causes thinned (:func:`quiet_logger`)
    quiet: ClassVar[logging.Logger | None] = None
    #: requests per connection, and seconds from its first, after which it closes (0: no limit)
    keepalive_requests: ClassVar[int] = 0
    max_age_s: ClassVar[float] = 0.0

    @classmethod
    def under(
        cls,
        limits: Limits,
        counter: RefusalCounter | None = None,
        keepalive_requests: int = 0,
        max_age_s: float = 0.0,
    ) -> type[GuardedHttp]:
        """The protocol class uvicorn instantiates per connection, under ``limits``."""
        attributes = {"limits": limits, "counter": counter, "quiet": quiet_logger(),
                      "keepalive_requests": keepalive_requests, "max_age_s": max_age_s}  # fmt: skip
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.quiet is not None:
            self.logger = self.quiet
        super().connection_made(transport)
        self._head_bytes = 0  # of the request head under way (counted from whole reads)
        self._in_head = True  # no request line and headers complete since the last message
        self._begun = False  # a request begun and not complete
        self._made_at = self._last_data = self.loop.time()
        self._head_since: float | None = self._last_data  # the first request's: from the connection
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._got_data = False
        self._requests = 0  # requests begun on this connection
        self._first_request_at = 0.0
        if len(self.connections) > self.limits.max_connections:
            limit = self.limits.max_connections
            self._refuse(
                503, f"connections: this replica holds its limit of {limit}; retry", LINGER_OVER_LIMIT_S
            )
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
        self._got_data = True
        if self._in_head:
            self._head_bytes += len(data)
        self._last_data = self.loop.time()
        super().data_received(data)
        if self._refused:
            return
        if self._in_head and self._head_bytes > self.limits.max_request_head_bytes:
            self._refuse(431, self._too_long())
        elif self._timer is None and (self._begun or self._head_bytes):
            if self._in_head and self._head_since is None:  # bytes before a request: CRLFs
                self._head_since = self._last_data
            self._arm(self.limits.request_read_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._head_since is None:
            self._head_since = self._last_data  # the data it began in came then

    def on_headers_complete(self) -> None:
        limit = self.limits.max_request_head_bytes
        if self._head_bytes > limit:  # the read held more than a head's limit: measure this one
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limit:  # complete within one read, still too long
                self._refuse(431, self._too_long())
                raise _Refused  # the parser stops; uvicorn's 400 for it is a no-op now
        self._in_head, self._head_bytes, self._head_since = False, 0, None
        super().on_headers_complete()
        self._requests += 1
        if self._requests == 1:
            self._first_request_at = self._last_data
        last = (0 < self.keepalive_requests <= self._requests) or (
            0 < self.max_age_s <= self._last_data - self._first_request_at
        )
        if last and self.cycle is not None:  # its answer says Connection: close, then uvicorn closes
            self.cycle.keep_alive = False
            # the header too: older uvicorn releases write none for keep_alive alone, and a pooling
            # client would send its next request into the closing socket (a new list: the
            # server's default headers are shared by every connection)
            self.cycle.default_headers = [*self.cycle.default_headers, (b"connection", b"close")]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._begun = True, False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "request: not valid HTTP/1.1")

    def _too_long(self) -> str:
        return f"request: its line and headers exceed the limit of {self.limits.max_request_head_bytes} bytes"

    def _arm(self, delay: float) -> None:
        if not self._refused:  # a refused connection has its closing timer
            self._timer = self.loop.call_later(delay, self._check_reading)

    def _check_reading(self) -> None:
        """The timer: refuse a request that is too slow in coming, or look again when it may be."""
        self._timer = None
        timeout, now = self.limits.request_read_timeout_s, self.loop.time()
        if self._in_head and self._head_since is not None:  # a head on its way (or awaited)
            if self.flow.read_paused or not self._may_answer():
                left = timeout  # answers before it are on their way: its turn has not come
            else:
                left = self._head_since + timeout - now
            if left <= 0:
                self._refuse(408, f"request: its line and headers did not arrive within {timeout:g} s")
                return
        elif self._begun:  # a body on its way
            left = timeout if self.flow.read_paused else self._last_data + timeout - now
            if left <= 0:
                self._refuse(408, f"body: no data for {timeout:g} s")
                return
        else:
            return  # between requests: uvicorn's keep-alive timeout
        self._arm(left)

    def _may_answer(self) -> bool:
        """Whether an answer written now is the client's next one: for a request still coming
        in, once every answer before it is out; for one whose body is coming in, while its own
        answer has not begun."""
        cycle = self.cycle
        if cycle is None:
            return True
        if self._in_head:
            return cycle.response_complete and not self.pipeline
        return not cycle.response_started

    def _refuse(self, status: int, message: str, linger_s: float = LINGER_S) -> None:
        """Answer ``status`` with a JSON error — unless an answer is on its way (then nothing
        is written) — and end the connection; a request in progress is told its client left.
        Our side ends at once and, as nginx's lingering close, what the client still sends is
        read and dropped for up to ``linger_s`` before the socket closes: closed with unread
        data, the kernel would reset the connection, and a client still sending its headers or
        body would get the reset instead of the answer."""
        if self._refused:
            return
        self._refused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        answer = self._may_answer()
        cycle, counted_by_route = self.cycle, False
        if cycle is not None and not cycle.response_complete:  # its app's writes go nowhere now
            if not self._in_head:  # this request's own body: its route counts it, with this status
                cycle.scope.setdefault("state", {})[REFUSED_WITH] = status
                counted_by_route = True
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            body = orjson.dumps({"error": message})
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        if not self.transport.can_write_eof():
            self.transport.close()
        else:
            self.transport.write_eof()
            self._timer = self.loop.call_later(linger_s, self.transport.close)
        # in the request metrics, last (the connection is ended whatever the counter does); not a
        # connection that never sent a byte (a browser's preconnect, a balancer's spare), as nginx
        if self.counter is not None and not counted_by_route and (self._got_data or status == 503):
            try:
                self.counter.refused(status, self.loop.time() - self._made_at)
            except Exception:
                log.exception("counting a refused connection failed")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a refused request."""


class _Corked:
    """A transport whose writes wait for the end of the current event-loop callback and then go
    out joined; everything else is the transport's own. ``close`` writes what waits first."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._eof = False

    def write(self, data: bytes) -> None:
        if self._eof:  # after write_eof the transport refuses writes: what an app still sends goes nowhere
            return
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
        self._eof = True
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
