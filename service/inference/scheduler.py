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

So a short request that arrives while long ones decode starts at the next step and leaves when it
is done, instead of waiting for a whole static batch. The searches are the ones a static batch
uses, so a text decodes to the same tokens alone or in any company.

**Budget.** A text holds ``beam × (source length + its target limit)`` positions of the budget
from admission until it is done — the most rows × positions it can ever need — so the caches stay
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
from dataclasses import dataclass, field
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
from service.inference.decoding import (
    GreedySearch,
    Scores,
    Search,
    best_tokens,
    candidates_for,
    keep_rows,
    new_search,
)


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


@dataclass(frozen=True)
class Options:
    bos: int
    eos: int
    max_len: int  # target tokens, already capped by the model's limit
    beam_size: int = 1
    length_penalty: float = 0.0


@dataclass(eq=False)
class _Text:
    request: Request
    index: int
    ids: list[int]
    options: Options
    cost: int
    search: Search = field(init=False)


@dataclass(eq=False)
class _Retired:
    """The rows of a text that is done, left in the batch until the next compaction (see
    ``RETIRED_SHARE``): stepped with the others, their outputs ignored."""

    rows: int


#: while rows decode, newcomers are admitted once those that fit are 1/GATHER_SHARE of the running
#: rows, or GATHER_STEPS steps after the last admission (see ``_admit``)
GATHER_SHARE, GATHER_STEPS = 4, 4
#: a finished text's rows stay in the batch until retired rows are 1/RETIRED_SHARE of it, or
#: newcomers join, or a caller leaves: taking rows out copies every row's cache and encoder
#: outputs, which cost more than stepping a few extra rows (one copy per retirement was a fifth
#: of the stepping thread's time under open-loop load on the demo model)
RETIRED_SHARE = 4
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
        self._waiting: deque[_Text] = deque()
        #: in row order: each text owns search.rows consecutive rows, each _Retired its rows
        self._active: list[_Text | _Retired] = []
        self._retired = 0  # rows of _Retired entries in the batch
        self._batch: Any = None
        self._in_flight = 0  # budget held by active texts
        self._lock = threading.Lock()  # guards _waiting, _requests, _closed, _thread
        self._arrival = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._requests: set[Request] = set()
        self._closed = False
        self.steps = 0
        self._rows_stepped = 0  # rows in the last step (0: none ran)
        self._admitted_at = -GATHER_STEPS  # the step count at the last admission

    # -- what the worker and metrics read ---------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting or decoding: the places taken."""
        return len(self._requests)

    @property
    def rows(self) -> int:
        """Rows of texts still decoding (not counting retired rows awaiting compaction)."""
        return sum(t.search.rows for t in self._active if isinstance(t, _Text))

    @property
    def tokens_in_flight(self) -> int:
        """Positions the running batch holds (rows × their past): what the budget bounds."""
        return self._in_flight

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
        request.on_tokens, request.interval_s = on_tokens, interval_s
        request.remaining = request.pending_first = len(ids)
        self._add(request, ids, options)
        return request

    #: whether the loop runs on a thread of its own (a decode process's runs on its main thread)
    threaded = True

    def _add(self, request: Request, ids: list[list[int]], options: Options) -> None:
        """Queue ``request``'s texts and start the loop's thread if it is not running."""
        texts = [
            _Text(request, i, row, options, options.beam_size * (len(row) + options.max_len))
            for i, row in enumerate(ids)
        ]
        with self._lock:
            self._waiting.extend(texts)
            self._requests.add(request)
            if self._thread is None and self.threaded:
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="translation-scheduler", daemon=True)
                self._thread.start()
            self._arrival.notify()

    def release(self, request: Request) -> None:
        """The caller is done with ``request``: unanswered (it left), its waiting texts leave now
        and its rows leave the batch at the next step."""
        with self._lock:
            if not request.future.done() or request.future.cancelled():
                request.cancelled = True
                request.future.cancel()
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
        return not self._waiting and not self._active

    def _pass(self) -> None:
        """One pass of the loop: admit, step, answer."""
        with self._lock:
            admitted = self._admit()
        start = time.perf_counter()
        try:
            finished = self._iterate(admitted)
        except Exception as exc:  # the graph failed: every request in the batch gets the error
            self._fail(admitted, exc)
            return
        self._answer(finished)
        if self.on_step is not None:  # also after a pass without a step: its last callers left
            self.on_step(self._rows_stepped, self.rows, self._in_flight, time.perf_counter() - start)

    def _admit(self) -> list[_Text]:
        """(Under the lock.) Oldest first while the budget allows; a text over the whole budget goes alone.

        Admission costs an encoder call and a copy of the running batch's state, so while rows are
        decoding, newcomers are gathered: they join once those that fit the budget are a quarter
        of the running rows, or four steps after the last admission (an idle model admits at
        once). Under load, when every retirement frees room for one text, this admits groups
        every few steps instead of one text (and one copy of the batch) at every step."""
        admitted: list[_Text] = []
        rows = self.rows
        if rows and self._waiting and self.steps - self._admitted_at < GATHER_STEPS:
            fit, held = 0, self._in_flight
            for text in self._waiting:
                if text.request.cancelled:
                    continue
                if fit * GATHER_SHARE >= rows or held + text.cost > self.token_budget:
                    break
                fit, held = fit + 1, held + text.cost
            if fit * GATHER_SHARE < rows:
                return admitted
        while self._waiting:
            text = self._waiting[0]
            if text.request.cancelled:
                self._waiting.popleft()
                continue
            alone = not self._active and not admitted
            if not alone and self._in_flight + text.cost > self.token_budget:
                break
            self._waiting.popleft()
            self._in_flight += text.cost
            admitted.append(text)
        if admitted:
            self._admitted_at = self.steps
        return admitted

    def _iterate(self, admitted: list[_Text]) -> list[Request]:
        """One step: drop the cancelled, add the admitted, step, retire."""
        now = time.perf_counter()
        self._drop_cancelled()
        joining: list[_Text] = []
        for text in admitted:
            if text.request.cancelled:  # its caller left since admission
                self._in_flight -= text.cost
            else:
                joining.append(text)
        admitted = joining
        if admitted and self._retired:  # the join copies every row anyway: compact first
            self._compact()
        if admitted:
            for text in admitted:
                o, source = text.options, len(text.ids)
                text.search = new_search(o.bos, o.eos, o.max_len, o.beam_size, o.length_penalty, source)
                if text.request.admitted is None:
                    text.request.admitted = now
            fresh = self.decoder.encode([t.ids for t in admitted])
            self._batch = fresh if self._batch is None else type(fresh).concat([self._batch, fresh])
            self._active.extend(admitted)
        self._rows_stepped = 0
        if not self._active:
            return []
        live = [t for t in self._active if isinstance(t, _Text)]
        fed = [
            (token, t.search.steps) if isinstance(t, _Text) else (0, 0)
            for t in self._active
            for token in (t.search.feed() if isinstance(t, _Text) else range(t.rows))
        ]
        tokens, positions = np.ascontiguousarray(np.array(fed, dtype=np.int64).reshape(-1, 2).T)
        candidates = candidates_for(max(t.options.beam_size for t in live))
        logp, attention, batch = self.decoder.step(self._batch, tokens, positions, None, candidates)
        self.steps += 1
        rows = self._rows_stepped = len(tokens)
        done_at = time.perf_counter()
        best, values = best_tokens(logp)  # every greedy row's choice, in one call
        chosen, best_ids = values.tolist(), best.tolist()
        index: list[np.ndarray] = []
        still: list[_Text | _Retired] = []
        finished: list[Request] = []
        offset = 0
        streaming: set[Request] = set()  # requests whose greedy texts chose a token
        for entry in self._active:
            if isinstance(entry, _Retired):  # kept as they are
                index.append(np.arange(offset, offset + entry.rows))
                still.append(entry)
                offset += entry.rows
                continue
            text, search = entry, entry.search
            n = search.rows
            request = text.request
            first = search.steps == 0
            if isinstance(search, GreedySearch):
                kept = search.choose(best_ids[offset], chosen[offset], attention[offset])
                if request.on_tokens is not None:
                    token = StepToken(text.index, best_ids[offset], chosen[offset], attention[offset])
                    request.held.append(token)
                    streaming.add(request)
            else:
                kept = search.advance(logp[offset : offset + n], attention[offset : offset + n])
            offset += n
            if first:
                request.pending_first -= 1
                if request.pending_first == 0:
                    request.first_token = done_at
            if search.done:
                request.searches[text.index] = search  # its hypothesis is built on the caller's loop
                request.remaining -= 1
                self._in_flight -= text.cost
                if request.remaining == 0:
                    finished.append(request)
                index.append(np.arange(offset - n, offset))  # its rows stay until compaction
                still.append(_Retired(n))
                self._retired += n
            else:
                index.append(kept + (offset - n))
                still.append(text)
        stepped = rows - sum(t.rows for t in self._active if isinstance(t, _Retired))
        for request in {t.request for t in live}:
            request.steps += 1
            request.rows_seen += stepped
        streamed = due_tokens(streaming, done_at)  # an answered request's last go with its answer
        if streamed:  # before any answer
            self._stream(streamed)
        self._active = still
        self._batch = keep_rows(batch, np.concatenate(index), rows)
        if self._retired and self._retired * RETIRED_SHARE >= rows:
            self._compact()
        for request in finished:
            request.done = done_at
        return finished

    def _drop_cancelled(self) -> None:
        """Take the rows of requests whose caller left out of the batch (and retired rows with
        them: it is a copy of every row either way)."""
        if any(isinstance(t, _Text) and t.request.cancelled for t in self._active):
            self._compact()

    def _compact(self) -> None:
        """Keep only the rows of texts still decoding (one copy of the batch's state); the texts
        of requests whose caller left go too, and give back their budget.

        A caller leaves on its own event loop at any moment (``release``), so each text's
        ``cancelled`` is read once here: the rows kept, the texts kept and the budget returned
        must agree even when a caller leaves during the compaction."""
        keep: list[np.ndarray] = []
        active: list[_Text | _Retired] = []
        offset = 0
        for entry in self._active:
            n = entry.rows if isinstance(entry, _Retired) else entry.search.rows
            if isinstance(entry, _Text):
                if entry.request.cancelled:
                    self._in_flight -= entry.cost
                else:
                    keep.append(np.arange(offset, offset + n))
                    active.append(entry)
            offset += n
        self._active = active
        self._batch = self._batch[np.concatenate(keep)] if active else None
        self._retired = 0

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

    def _fail(self, admitted: list[_Text], exc: BaseException) -> None:
        """The step failed: every request in the batch ends with ``exc``."""
        active = [t for t in self._active if isinstance(t, _Text)]
        texts = [*active, *(t for t in admitted if t not in active)]
        failed = {t.request for t in texts}
        self._failed(failed, exc)
        with self._lock:
            self._waiting = deque(t for t in self._waiting if t.request not in failed)
        self._active, self._batch = [], None
        self._in_flight = self._retired = 0
