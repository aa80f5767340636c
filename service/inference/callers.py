"""What the translation scheduler hands its callers, and how: from its own thread to each
caller's event loop.

The scheduler (``service/inference/scheduler.py``) steps on a thread of its own; its callers wait
on their event loops. Everything that crosses is here: the tokens chosen for a streaming caller
(:class:`StepToken`; a step's, or the steps' within its interval), a finished request's answer
(:class:`Decoded`, built on the caller's loop, off the stepping thread), and
:func:`on_their_loops`, which runs a step's callbacks with one wake-up per loop — each wake-up is
a write to the loop's self-pipe on the thread that steps the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.inference.decoding import Hypothesis, Search

T = TypeVar("T")


@dataclass(slots=True)  # one per token: a frozen dataclass is built ≈ 5 × slower
class StepToken:
    """A token a greedy text chose at a step, for a streaming caller."""

    text: int  # which of the request's texts
    token: int  # its id (the EOS id when the text ends)
    logprob: float
    attention: np.ndarray  # that step's attention row: (S,) or (layers, heads, S), S the batch's width


#: a call to run on an event loop (:func:`on_their_loops`)
LoopCall = tuple[asyncio.AbstractEventLoop, Callable[[], None]]
#: a streaming caller's sink: called on its event loop with the tokens chosen since the last call
#: (one step's, or every step's within the request's ``interval_s``)
OnTokens = Callable[[list[StepToken]], None]


@dataclass
class Decoded:
    """One request's hypotheses (one per text, in order) and what they cost."""

    hypotheses: list[Hypothesis]
    queue_wait_s: float  # arrival → its first text admitted
    time_to_first_token_s: float  # arrival → the first step that gave every text a token
    compute_s: float  # first admission → last text done
    steps: int  # decoder steps it took part in
    mean_rows: float  # rows per step over those steps (the batch it shared)


@dataclass(eq=False)
class Request:
    """A caller's request as the scheduler's thread tracks it."""

    loop: asyncio.AbstractEventLoop  # the caller's: where its future is settled
    future: asyncio.Future[Decoded]
    arrived: float
    searches: list[Search | None]
    admitted: float | None = None
    first_token: float | None = None
    done: float | None = None
    steps: int = 0
    rows_seen: int = 0
    cancelled: bool = False
    remaining: int = 0
    pending_first: int = 0  # texts that have not produced a token yet
    on_tokens: OnTokens | None = None  # streaming: where greedy texts' chosen tokens go
    #: streaming: tokens chosen within this many seconds of the last delivery wait for the next
    #: (the first goes at once, the last with the answer): ``Submitting.enqueue``'s ``interval_s``
    interval_s: float = 0.0
    held: list[StepToken] = field(default_factory=list)  # chosen, not yet delivered
    delivered_at: float = -math.inf  # perf_counter time of the last delivery


def decoded(request: Request) -> Callable[[], Decoded]:
    """The answer of a finished request, to be built on its caller's loop (stacking each
    hypothesis's attention), off the thread that steps the batch."""
    admitted, first_token = request.admitted, request.first_token
    assert admitted is not None and first_token is not None
    done = request.done or time.perf_counter()
    searches = [s for s in request.searches if s is not None]
    return lambda: Decoded(
        [s.result() for s in searches],
        queue_wait_s=admitted - request.arrived,
        time_to_first_token_s=first_token - request.arrived,
        compute_s=done - admitted,
        steps=request.steps,
        mean_rows=request.rows_seen / max(1, request.steps),
    )


def settler(request: Request, outcome: Callable[[], Decoded] | BaseException) -> Callable[[], None]:
    """(To run on ``request``'s caller loop.) Resolve its future with the outcome, unless the
    caller left meanwhile; an answer that fails to build fails the request, never the loop."""

    def settle() -> None:
        if request.future.done():  # the caller left meanwhile
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
            return
        try:
            request.future.set_result(outcome())
        except Exception as exc:
            request.future.set_exception(exc)

    return settle


def due_tokens(requests: Iterable[Request], now: float) -> dict[Request, list[StepToken]]:
    """The held tokens of these requests that are due at ``now`` (perf_counter time), taken from
    them: those of a request still decoding whose interval since its last delivery is over (its
    first tokens at once). A request whose texts are all done keeps its last ones for its answer
    (:func:`take_held`)."""
    due = {}
    for request in requests:
        if request.remaining and now >= request.delivered_at + request.interval_s:
            due[request], request.held = request.held, []
            request.delivered_at = now
    return due


def take_held(requests: Iterable[Request]) -> dict[Request, list[StepToken]]:
    """The tokens these (ending) requests still hold for their streams, taken from them."""
    held = {}
    for request in requests:
        if request.held:
            held[request], request.held = request.held, []
    return held


def token_calls(streamed: dict[Request, list[StepToken]]) -> Iterator[LoopCall]:
    """Each streaming request's tokens as a call for :func:`on_their_loops`."""
    for request, tokens in streamed.items():
        if request.on_tokens is not None:
            yield request.loop, functools.partial(request.on_tokens, tokens)


def on_their_loops(calls: Iterable[LoopCall]) -> None:
    """(From the scheduler's thread.) Run each call on its loop, in order, with one
    ``call_soon_threadsafe`` per loop; a closed loop has nobody left to tell."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
    for loop, fn in calls:
        by_loop.setdefault(loop, []).append(fn)
    for loop, fns in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_run_each, fns)


def _run_each(fns: list[Callable[[], None]]) -> None:
    for fn in fns:
        fn()


class Submitting:
    """What a scheduler's callers call — the in-process one (``scheduler.py``) and the decode
    process's parent (``decode_process.py``) both: :meth:`enqueue` a request, wait for it,
    :meth:`release` it."""

    def enqueue(
        self,
        ids: list[list[int]],
        options: Any,
        on_tokens: OnTokens | None = None,
        attention: bool = True,
        interval_s: float = 0.0,
    ) -> Request:
        raise NotImplementedError

    def release(self, request: Request) -> None:
        raise NotImplementedError

    async def submit(
        self,
        ids: list[list[int]],
        options: Any,
        on_tokens: OnTokens | None = None,
        attention: bool = True,
    ) -> Decoded:
        """Decode ``ids`` (one list of source ids per text) and wait for every text's hypothesis.

        ``on_tokens``, when given, is called on the caller's event loop after every step with the
        tokens its greedy texts chose at that step (all before the answer); beam texts deliver
        nothing before their answer — a beam's best prefix can still change. (:meth:`enqueue`'s
        ``interval_s`` coalesces those calls.)"""
        request = self.enqueue(ids, options, on_tokens, attention)
        try:
            return await request.future
        finally:
            self.release(request)


async def all_or_none(calls: list[Awaitable[T]]) -> list[T]:
    """Every call's answer, in order; once one fails the others are cancelled (``gather`` let
    them run: a request shed part-way still had its accepted images computed, and a translation
    split into batch-sized parts its other parts, holding places that other requests were then
    refused)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done
