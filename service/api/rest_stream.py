"""Streamed translations over REST: Server-Sent Events (``text/event-stream``).

``POST /v1/models/{name}/translate`` with ``"stream": true`` (or ``Accept: text/event-stream``)
answers one ``token`` event per output token as the model's scheduler chooses it, then one
``answer`` event with the whole answer — the JSON the non-streaming call gives, metrics included::

    event: token
    data: {"text_index":0,"index":0,"token":"▁2024","token_id":17,"text":"2024","logprob":-0.01}

    event: answer
    data: {"model":"dates-transformer","version":1,"translations":[...],"metrics":{...}}

With ``return_attention`` each token event carries its alignment row over the text's source
tokens (``attention``), and with ``attention_layers: "all"`` every layer's and head's row
(``attention_layers``, layers × heads × source). Beam search sends the ``answer`` event alone (a
beam's best prefix can change until it ends). An error before the first event is the ordinary
JSON 4xx/5xx; one after it is an ``error`` event with the same ``{"error": ...}`` body, and the
stream ends.

A client that disconnects cancels the request: its rows leave the batch at the next decoder
step. One that stops reading is not buffered for: a write blocked for longer than
``limits.stream_write_timeout_s`` ends the stream, which cancels the request the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.content_coding import accept_weights
from service.api.rest_codec import answer_json, dumps, heavy, rounded
from service.api.schemas import TranslateRequest
from service.api.server import Server
from service.errors import ServiceError, unexpected
from service.inference.jobs import Answer, LastTokens, TokenEvent, Tokens, TranslateJob

log = logging.getLogger(__name__)
#: what ``Server.stream`` yields: (the model's entry, tokens or the answer, ms since the request began)
Event = tuple[Any, Tokens | Answer, float]
MEDIA_TYPE = "text/event-stream"


def wants_stream(body: TranslateRequest, accept: str) -> bool:
    """``stream: true``, or an ``Accept`` that names ``text/event-stream`` (in any case) and weighs
    it at least as high as JSON (``application/json``, else ``application/*``, else ``*/*``):
    ``text/event-stream;q=0`` refuses it, a lower weight than JSON's prefers JSON."""
    if body.stream:
        return True
    if "event-stream" not in accept.lower():  # the common case, without parsing
        return False
    weights = accept_weights(accept)
    sse = weights.get(MEDIA_TYPE, 0.0)
    json = weights.get("application/json", weights.get("application/*", weights.get("*/*", 0.0)))
    return sse > 0 and sse >= json


async def translate_stream(
    server: Server, name: str, body: TranslateRequest, job: TranslateJob
) -> StreamingResponse:
    """The SSE response; raises (→ an ordinary JSON error) when the request fails before its
    first event."""
    events = server.stream(name, "translation", "translate_stream", job)
    first = await anext(events)  # refusals and failures before any token: a plain error answer
    return EventStream(first, events, body, server.settings.limits.stream_write_timeout_s)


def _encode(item: Tokens | Answer, body: TranslateRequest, elapsed_ms: float) -> bytes:
    """One write: the answer, or every token that is ready (several events in one chunk)."""
    if isinstance(item, Answer):
        return _event("answer", answer_json(item, body, elapsed_ms))
    return b"".join(map(token_event, item))


async def _encoded(item: Tokens | Answer, body: TranslateRequest, elapsed_ms: float) -> bytes:
    """:func:`_encode`, in a thread for an answer with PNG heat maps or many values
    (``rest_codec.heavy``)."""
    if isinstance(item, Answer) and heavy(item, body):
        return await asyncio.to_thread(_encode, item, body, elapsed_ms)
    return _encode(item, body, elapsed_ms)


def token_event(event: TokenEvent) -> bytes:
    """A ``token`` event: its data the JSON object of the event's fields (``attention`` and
    ``attention_layers`` rounded, when present)."""
    item: dict[str, Any] = {
        "text_index": event.text_index, "index": event.index, "token": event.token,
        "token_id": event.token_id, "text": event.piece, "logprob": round(event.logprob, 6),
    }  # fmt: skip
    if event.alignment is not None:
        item["attention"] = rounded(event.alignment)
    if event.layers is not None:
        item["attention_layers"] = rounded(event.layers)
    return b"event: token\ndata: " + dumps(item) + b"\n\n"  # _event's, spelt out: once per token


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class EventStream(StreamingResponse):
    """A streamed translation's events (``Server.stream``'s first one, already received, then the
    rest) encoded and written one chunk each, as a ``text/event-stream`` response in the request's
    own task. The client leaving (the next
    ``receive`` answers ``http.disconnect``) cancels it, and so does one write blocked for longer
    than ``write_timeout_s`` (a client that stops reading fills the socket's buffers and uvicorn's
    flow control holds the write); either way the request is cancelled and its rows leave the
    batch. One waiting ``receive`` and one coarse timer per stream: Starlette's task group and a
    timeout around every write cost more than the writes."""

    media_type = MEDIA_TYPE

    def __init__(
        self,
        first: Event,
        rest: AsyncIterator[Event],
        body: TranslateRequest,
        write_timeout_s: float,
    ) -> None:
        super().__init__(cast(Any, rest), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.first, self.rest, self.request = first, rest, body
        self.write_timeout_s = write_timeout_s
        self._writing_since: float | None = None  # loop time the pending write began
        self._cut = False  # cancelled here: the client left or stopped reading
        self._over = False  # the last write is out: nothing more to cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def cut(why: str, level: int = logging.INFO) -> None:
            if not self._cut and not self._over:
                log.log(level, "a stream ended early: %s", why)
                self._cut = True
                task.cancel()

        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal timer
            since = self._writing_since
            if since is not None and loop.time() - since >= self.write_timeout_s:
                cut(f"its client stopped reading for {self.write_timeout_s} s", logging.WARNING)
            else:
                timer = loop.call_later(min(self.write_timeout_s / 4, 1.0), check)

        left = asyncio.ensure_future(receive())  # completes when the client disconnects
        left.add_done_callback(lambda f: None if f.cancelled() else cut("its client disconnected"))
        timer = loop.call_later(min(self.write_timeout_s / 4, 1.0), check)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not self._cut:
                raise
            task.uncancel()  # ours: the connection closes unfinished, the request was cancelled
        finally:
            self._over = True
            left.cancel()
            if timer is not None:
                timer.cancel()

    async def stream_response(self, send: Send) -> None:
        """The events as chunks of the response body, each written as soon as it is encoded: the
        last (the answer, or an error) with the chunked body's end in one write, and with the last
        tokens when they came just before it."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body, rest = self.request, self.rest
        held = b""  # the last tokens (LastTokens), written with the answer that follows them at once
        try:
            try:
                item: Event | None = self.first
                while item is not None:
                    _, event, elapsed = item
                    if isinstance(event, LastTokens):
                        held = _encode(event, body, elapsed)
                    elif await self._write(
                        send, held + await _encoded(event, body, elapsed), isinstance(event, Answer)
                    ):
                        return
                    else:
                        held = b""
                    item = await anext(rest, None)
                chunk, last = held, False
            except ServiceError as exc:
                chunk, last = held + _event("error", dumps({"error": exc.message})), True
            except Exception as exc:  # logged with its traceback and a request id, as every 500
                if self._writing_since is not None:  # a write failed, not the model: nobody to tell
                    raise
                message = unexpected(exc, "translate stream").message
                chunk, last = held + _event("error", dumps({"error": message})), True
            if chunk and await self._write(send, chunk, last):
                return
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._over = True

    async def _write(self, send: Send, chunk: bytes, last: bool) -> bool:
        """Write one chunk (timed, for the slow-reader cut); whether it ended the body."""
        self._writing_since = asyncio.get_running_loop().time()
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        self._writing_since = None
        if last:
            self._over = True  # before the loop runs again: the client may close now
        return last
