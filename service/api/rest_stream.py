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

from service.api.rest_codec import answer_json, dumps, rounded
from service.api.schemas import TranslateRequest
from service.api.server import Server
from service.errors import ServiceError, unexpected
from service.inference.jobs import Answer, LastTokens, TokenEvent, Tokens, TranslateJob

log = logging.getLogger(__name__)
MEDIA_TYPE = "text/event-stream"


def wants_stream(body: TranslateRequest, accept: str) -> bool:
    return body.stream or MEDIA_TYPE in accept


async def translate_stream(
    server: Server, name: str, body: TranslateRequest, job: TranslateJob
) -> StreamingResponse:
    """The SSE response; raises (→ an ordinary JSON error) when the request fails before its
    first event."""
    events = server.stream(name, "translation", "translate_stream", job)
    first = await anext(events)  # refusals and failures before any token: a plain error answer
    return EventStream(_sse(first, events, body), server.settings.limits.stream_write_timeout_s)


async def _sse(
    first: tuple[Any, Tokens | Answer, float],
    rest: AsyncIterator[tuple[Any, Tokens | Answer, float]],
    body: TranslateRequest,
) -> AsyncIterator[tuple[bytes, bool]]:
    """The stream's chunks, each with whether it is the last (the answer or an error): the last
    goes out with the chunked body's end in one write, and with the last tokens when they came
    just before it."""
    held = b""  # the last tokens (LastTokens), written with the answer that follows them at once
    try:
        item: tuple[Any, Tokens | Answer, float] | None = first
        while item is not None:
            _, event, elapsed = item
            if isinstance(event, LastTokens):
                held = _encode(event, body, elapsed)
            else:
                yield held + _encode(event, body, elapsed), isinstance(event, Answer)
                held = b""
            item = await anext(rest, None)
        if held:
            yield held, False
    except ServiceError as exc:
        yield held + _event("error", dumps({"error": exc.message})), True
    except Exception as exc:  # logged with its traceback and a request id, as every 500
        message = unexpected(exc, "translate stream").message
        yield held + _event("error", dumps({"error": message})), True
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _encode(item: Tokens | Answer, body: TranslateRequest, elapsed_ms: float) -> bytes:
    """One write: the answer, or every token that is ready (several events in one chunk)."""
    if isinstance(item, Answer):
        return _event("answer", answer_json(item, body, elapsed_ms))
    return b"".join(_event("token", dumps(token_json(t))) for t in item)


def token_json(event: TokenEvent) -> dict[str, Any]:
    item: dict[str, Any] = {
        "text_index": event.text_index, "index": event.index, "token": event.token,
        "token_id": event.token_id, "text": event.piece, "logprob": round(event.logprob, 6),
    }  # fmt: skip
    if event.alignment is not None:
        item["attention"] = rounded(event.alignment)
    if event.layers is not None:
        item["attention_layers"] = rounded(event.layers)
    return item


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response in the request's own task. The client leaving (the next
    ``receive`` answers ``http.disconnect``) cancels it, and so does one write blocked for longer
    than ``write_timeout_s`` (a client that stops reading fills the socket's buffers and uvicorn's
    flow control holds the write); either way the request is cancelled and its rows leave the
    batch. One waiting ``receive`` and one coarse timer per stream: Starlette's task group and a
    timeout around every write cost more than the writes."""

    media_type = MEDIA_TYPE

    def __init__(self, content: AsyncIterator[tuple[bytes, bool]], write_timeout_s: float) -> None:
        super().__init__(cast(Any, content), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        chunks: Any = self.body_iterator
        try:
            async for chunk, last in chunks:
                self._writing_since = loop.time()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                self._writing_since = None
                if last:
                    self._over = True  # before the loop runs again: the client may close now
                    return
        finally:
            await chunks.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._over = True
