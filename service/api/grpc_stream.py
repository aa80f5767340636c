"""How one KServe ``ModelStreamInfer`` stream is answered, as Triton's stream handler answers it:
its requests are taken as they arrive and computed concurrently, each plain request's answer is
written in the order the requests came (a client without request ids matches answers by their
order), and a decoupled request's responses (``stream: true``: a token each, then the answer) go
out as they are made. At most ``window`` requests are in the server at once, counted until their
last response is written: beyond that the stream is read no further, and gRPC's flow control
holds the client back, so one stream holds at most ``window`` answers in memory.

Transport-free: :func:`answer_in_order` takes any async iterator of requests and a function giving
each request's responses; ``service/api/grpc_servicer.py`` plugs the RPC in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


@dataclass
class _Plain(Generic[Reply]):
    """A plain request's place in the answer order: its response, once made."""

    replies: list[Reply] = field(default_factory=list)
    done: bool = False


async def answer_in_order(
    requests: AsyncIterator[Request],
    replies_of: Callable[[Request], AsyncIterator[Reply]],
    decoupled: Callable[[Request], bool],
    failed: Callable[[Request, BaseException], Reply],
    window: int,
) -> AsyncGenerator[Reply, None]:
    """The stream's responses. ``replies_of(request)``: its responses (one for a plain request);
    ``decoupled(request)``: whether they go out as made rather than in request order;
    ``failed(request, exc)``: the response of a request whose computation raised, or was cancelled
    from elsewhere (every request gets an answer). Closing the generator (the client left) cancels
    every request still computing."""
    events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()  # bounded by the window
    slots = asyncio.Semaphore(window)
    order: deque[_Plain[Reply]] = deque()
    computing: set[asyncio.Task[None]] = set()

    async def compute(request: Request, plain: _Plain[Reply] | None) -> None:
        try:
            async for reply in replies_of(request):
                if plain is None:
                    events.put_nowait(("reply", reply))
                else:
                    plain.replies.append(reply)
        except BaseException as exc:  # what replies_of did not answer itself
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # the stream is being torn down: nobody to answer
            reply = failed(request, exc)  # a failure, or cancelled by something else: still answered
            events.put_nowait(("reply", reply)) if plain is None else plain.replies.append(reply)
        finally:
            if plain is not None:
                plain.done = True
            events.put_nowait(("done", plain))

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                plain = None if decoupled(request) else _Plain[Reply]()
                if plain is not None:
                    order.append(plain)
                task = asyncio.create_task(compute(request, plain))
                computing.add(task)
                task.add_done_callback(computing.discard)
            if computing:
                await asyncio.wait(set(computing))
        finally:
            events.put_nowait(("end", None))  # the end, or the reader's failure (raised below)

    reader = asyncio.create_task(read())
    try:
        while True:
            kind, item = await events.get()
            if kind == "end":
                break
            if kind == "reply":
                yield item  # type: ignore[misc]
            elif item is None:  # a decoupled request's last response is out
                slots.release()
            else:  # a plain request is answered: write the answers now due, in request order
                while order and order[0].done:
                    for reply in order.popleft().replies:
                        yield reply
                    slots.release()
        await reader
    finally:  # the client left (or the stream failed): its requests are cancelled
        for task in (reader, *computing):
            task.cancel()
