"""Iteration-level (continuous) batching for one translation model.

A long-lived loop per model. At every decoder step it

1. drops the rows of requests whose caller left (a client gone, a deadline passed);
2. admits waiting texts, oldest first, while the token budget allows: they are encoded in one
   encoder call and their rows join the running batch (a longer source pads the batch on the
   right, a shorter past is masked on the left — see ``RowBatch`` and ``KVCache``);
3. runs one decoder step for every live row — greedy rows and beam hypotheses of different
   requests together, each at its own position;
4. advances each text's own search (``service/inference/decoding.py``), reorders the rows of
   beams, retires finished texts and answers a request as soon as its last text is done.

What a step does to the rows (join, feed, advance, keep, compact) is ``RunningBatch``'s
(``service/inference/running_batch.py``); this module decides who joins and when, runs the loop
and reaches the callers.

So a short request that arrives while long ones decode starts at the next step and leaves when it
is done, instead of waiting for a whole static batch. The searches are the ones a static batch
uses, so a text decodes to the same tokens alone or in any company.

**Budget.** The texts admitted and not yet done hold ``rows × (longest source + longest target
limit)`` positions of the budget — every row is padded to the widest, so this bounds what the
encoder outputs and the KV cache can take (``running_batch.HeldBudget``) — so the caches stay
bounded. Admission is first-in, first-out by text: a text that does not fit waits at the head and
later ones wait behind it, so no request is starved by a stream of later (smaller) ones. A text
larger than the whole budget runs when nothing else does.

Contracts: the KV-cached Transformer step (``transformer-kv``) and the RNN step, which carry a
per-row state and position. The whole-prefix ``transformer`` contract (older repositories) cannot
put rows at different positions in one call; such models keep static batches.

**Threads.** The loop runs on a thread of its own, which steps back to back while there are rows
and sleeps when there are none; callers ``await`` on their event loop and are answered there
(``service/inference/callers.py``). ONNX Runtime releases the GIL while a step computes, so the
event loop tokenises, answers and accepts meanwhile — and a step never waits for the event loop to get round
to it: handing every step to a thread pool and back cost two thread wake-ups per step (≈ 0.15 ms
each on the 2-core reference machine, half a lone request's latency).

**Streaming.** A caller may pass a sink for its tokens: the tokens its greedy texts choose reach it
on its event loop, before its answer does — after each step, or held here until a step after the
caller's interval (the first at once, the last with the answer).

Plain threading + numpy. Unit-tested without Ray (``tests/service/inference/test_scheduler.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from service.inference.callers import (
    OnTokens,
    Request,
    StepToken,
    Submitting,
    decoded,
    due_tokens,
    on_their_loops,
    settler,
    take_held,
    token_calls,
)
from service.inference.decoding import Options, Scores, candidates_for
from service.inference.running_batch import RunningBatch, Text, positions


class Decoder(Protocol):
    """What the loop needs of a model (``service.inference.translation.Translator``)."""

    def encode(self, rows: list[list[int]]) -> Any: ...

    def step(
        self,
        batch: Any,
        tokens: np.ndarray,
        positions: np.ndarray,
        prefixes: np.ndarray | None,
        candidates: int = 1,
    ) -> tuple[Scores, np.ndarray, Any]: ...


#: while rows decode, newcomers are admitted once those that fit are 1/GATHER_SHARE of the running
#: rows, or GATHER_STEPS steps after the last admission (see ``_admit``)
GATHER_SHARE, GATHER_STEPS = 4, 4
OnStep = Callable[[int, int, int, float], None]


class TranslationScheduler(Submitting):
    def __init__(self, decoder: Decoder, token_budget: int, on_step: OnStep | None = None) -> None:
        """``on_step(rows stepped, rows live after it, tokens in flight, seconds)`` is called on the
        scheduler's thread after each pass of its loop: a decoder step, or (0 rows stepped) a pass
        that only took out the rows of callers that left — metrics; keep it cheap and thread-safe."""
        if token_budget < 1:
            raise ValueError(f"token_budget must be ≥ 1, got {token_budget}")
        self.decoder = decoder
        self.on_step = on_step
        self.token_budget = token_budget
        self._waiting: deque[Text] = deque()
        self._running = RunningBatch()  # the rows decoding, on the loop's thread only
        self._lock = threading.Lock()  # guards _waiting, _requests, _closed, _thread
        self._arrival = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._requests: set[Request] = set()
        self._closed = False
        self.steps = 0
        #: since when (``time.monotonic()``) the pass now running has run (None between passes): a
        #: step that never returns, for the health check
        self.stepping_since: float | None = None
        self._rows_stepped = 0  # rows in the last step (0: none ran)
        self._admitted_at = -GATHER_STEPS  # the step count at the last admission
        #: requests a failed pass answered before it failed (:meth:`_iterate`): not failed again
        self._answered_before_failing: set[Request] = set()

    # -- what the worker and metrics read ---------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting or decoding: the places taken."""
        return len(self._requests)

    @property
    def rows(self) -> int:
        """Rows of texts still decoding (not counting retired rows awaiting compaction)."""
        return self._running.rows

    @property
    def tokens_in_flight(self) -> int:
        """Positions the running batch holds (rows × their past): what the budget bounds."""
        return self._running.in_flight

    # -- callers ---------------------------------------------------------------------------------

    def enqueue(
        self,
        ids: list[list[int]],
        options: Options,
        on_tokens: OnTokens | None = None,
        attention: bool = True,
        interval_s: float = 0.0,
    ) -> Request:
        """:meth:`submit` without the wait, for a caller that waits on ``request.future`` itself
        (a stream, which also waits for its tokens): it must :meth:`release` the request once done
        with it, answered or not. ``attention`` is a hint (the answer may come without it when
        false: a decode process then does not copy it across); here it always comes.

        ``interval_s``: tokens chosen within this long of the last ``on_tokens`` call are held
        and go with the request's first step after it (the first tokens go at once, the last
        ones with the answer, in the same wake-up; a failed request's before its error): one
        wake-up of the caller's loop per interval instead of per step, and no timer — a request
        with a text still decoding steps again (one whose last texts wait for admission under
        the budget holds its tokens until they step)."""
        if not ids:
            raise ValueError("give at least one text")
        loop = asyncio.get_running_loop()
        request = Request(loop, loop.create_future(), time.perf_counter(), [None] * len(ids))
        self._add(request, ids, options, on_tokens, interval_s)
        return request

    #: whether the loop runs on a thread of its own (a decode process's runs on its main thread)
    threaded = True

    def _add(
        self, request: Request, ids: list[list[int]], options: Options, on_tokens: OnTokens | None,
        interval_s: float,
    ) -> None:  # fmt: skip
        """Set ``request`` up for its texts, queue them, and start the loop's thread if it is not
        running."""
        request.remaining = request.pending_first = len(ids)
        request.on_tokens, request.interval_s = on_tokens, interval_s
        texts = Text.of(request, ids, options)
        with self._lock:
            self._waiting.extend(texts)
            self._requests.add(request)
            if self._thread is None and self.threaded:  # closed, it ends again once idle
                self._thread = threading.Thread(target=self._run, name="translation-scheduler", daemon=True)
                self._thread.start()
            self._arrival.notify()

    def release(self, request: Request) -> None:
        """The caller is done with ``request``: unanswered (it left), its waiting texts leave now
        and its rows leave the batch at the next step."""
        with self._lock:
            if not request.future.done() or request.future.cancelled():
                request.future.cancel()
                self._withdraw(request)
            else:
                self._requests.discard(request)

    def _withdraw(self, request: Request) -> None:
        """Take an unanswered ``request`` out (the lock held, or on the loop's only thread): its
        waiting texts leave now, its rows leave the batch at the next step."""
        request.cancelled = True
        self._waiting = deque(t for t in self._waiting if t.request is not request)
        self._requests.discard(request)

    def close(self) -> None:
        """Stop once what is queued and running is done (a replaced version drains, then ends)."""
        with self._lock:
            self._closed = True
            self._arrival.notify()

    @property
    def running(self) -> bool:
        """Whether the loop's thread is alive (it ends after :meth:`close`, once drained)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- the loop (its own thread) ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while self.idle:
                    if self._closed:
                        self._thread = None
                        return
                    self._arrival.wait()
            self._pass()

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing decoding."""
        return not self._waiting and self._running.empty

    def _pass(self) -> None:
        """One pass of the loop: admit, step, answer."""
        with self._lock:
            admitted = self._admit()
        start = time.perf_counter()
        self.stepping_since = time.monotonic()
        try:
            finished = self._iterate(admitted)
        except Exception as exc:  # the graph failed: every request in the batch gets the error
            self._fail(admitted, exc)
            if self.on_step is not None:  # the batch is empty now: its gauges say so
                self.on_step(0, 0, 0, time.perf_counter() - start)
            return
        finally:
            self.stepping_since = None
        self._answer(finished)
        if self.on_step is not None:  # also after a pass without a step: its last callers left
            self.on_step(self._rows_stepped, self.rows, self._running.in_flight, time.perf_counter() - start)

    def _admit(self) -> list[Text]:
        """(Under the lock.) Oldest first while the budget allows; a text over the whole budget goes alone.

        Admission costs an encoder call and a copy of the running batch's state, so while rows are
        decoding, newcomers are gathered: they join once those that fit the budget are a quarter
        of the running rows, or four steps after the last admission (an idle model admits at
        once). Under load, when every retirement frees room for one text, this admits groups
        every few steps instead of one text (and one copy of the batch) at every step."""
        admitted: list[Text] = []
        running = self._running
        rows = running.rows
        holding = running.holding
        if rows and self._waiting and self.steps - self._admitted_at < GATHER_STEPS:
            fit, shape = 0, (holding.rows, holding.source, holding.target)
            for text in self._waiting:
                if text.request.cancelled:
                    continue
                if fit * GATHER_SHARE >= rows or positions(holding.with_(text, shape)) > self.token_budget:
                    break
                fit, shape = fit + 1, holding.with_(text, shape)
            if fit * GATHER_SHARE < rows:
                return admitted
        while self._waiting:
            text = self._waiting[0]
            if text.request.cancelled:
                self._waiting.popleft()
                continue
            alone = running.empty and not admitted
            if not alone and positions(holding.with_(text)) > self.token_budget:
                break
            self._waiting.popleft()
            holding.add(text)
            admitted.append(text)
        if admitted:
            self._admitted_at = self.steps
        return admitted

    def _iterate(self, admitted: list[Text]) -> list[Request]:
        """One step: drop the cancelled, add the admitted, step, stream, retire."""
        running, now = self._running, time.perf_counter()
        running.drop_cancelled()
        running.join(admitted, self.decoder.encode, now)
        self._rows_stepped = 0
        if running.empty:
            return []
        tokens, positions = running.feed()
        candidates = candidates_for(max(t.options.beam_size for t in running.texts))
        logp, attention, state = self.decoder.step(running.state, tokens, positions, None, candidates)
        self.steps += 1
        rows = self._rows_stepped = len(tokens)
        done_at = time.perf_counter()
        step = running.advance(logp, attention, done_at)
        streamed = due_tokens(step.streaming, done_at)  # an answered request's last go with its answer
        if streamed:  # before any answer, and before the copy of the batch's state below
            self._stream(streamed)
        for request in step.finished:
            request.done = done_at
        try:
            running.keep(state, step, rows)
        except Exception:  # the copy of the batch's state failed (out of memory): the requests
            self._answer(step.finished)  # this step finished are whole, and answered; the rest fail
            self._answered_before_failing = set(step.finished)
            raise
        return step.finished

    # -- what reaches the callers (on the stepping thread; a subclass may send it elsewhere) ------

    def _stream(self, streamed: dict[Request, list[StepToken]]) -> None:
        """Tokens now due to their streaming callers: one wake-up per caller loop (each loop
        keeps the order, so they arrive before any answer)."""
        on_their_loops(token_calls(streamed))

    def _answer(self, finished: list[Request]) -> None:
        """Answer this step's finished requests, each after its last held tokens: one wake-up per
        caller loop, not one per request (each is a write to the loop's self-pipe, on the thread
        that steps the batch), so a stream's last tokens and its answer are written together."""
        settle = [(r.loop, settler(r, decoded(r))) for r in finished]
        on_their_loops([*token_calls(take_held(finished)), *settle])

    def _failed(self, failed: set[Request], exc: BaseException) -> None:
        """Fail these requests, each after the tokens it held (a stream shows what was chosen
        before its error)."""
        on_their_loops([*token_calls(take_held(failed)), *((r.loop, settler(r, exc)) for r in failed)])

    def _fail(self, admitted: list[Text], exc: BaseException) -> None:
        """The step failed: every request in the batch ends with ``exc``, but those it answered
        before it failed. (An ``advance`` that raises part-way leaves the batch's entries as they
        were: a request whose last text it finished is among them, and fails with the rest.)"""
        active = self._running.texts
        texts = [*active, *(t for t in admitted if t not in active)]
        answered, self._answered_before_failing = self._answered_before_failing, set()
        failed = {t.request for t in texts if t.request not in answered}
        self._failed(failed, exc)
        with self._lock:
            self._waiting = deque(t for t in self._waiting if t.request not in failed)
        self._running.clear()
