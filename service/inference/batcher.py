"""Dynamic batching per model: one queue, one thread, one batch size — owned by the model's worker.

Why not Ray Serve's ``@serve.batch``: it keeps its queue per decorated *function*, shared by every
instance in the process, and runs a formed batch on the instance that sent its first request. A
replica holding several models (the in-replica frontend) or two versions of one model (a hot
swap) would mix their requests — an image reaching a translation runner, or one model's request
answered silently by another. Here each :class:`Batcher` belongs to one worker, so a batch only
ever holds that model's requests and runs on that model.

Semantics (those of ``@serve.batch``, plus what it lacked):

- A batch holds at most ``max_batch_size`` *units* (a translation counts each text); a batch
  forms as soon as it is full, or ``wait_s`` after its oldest item arrived. An item larger than
  a whole batch runs alone (callers split requests first; see ``ModelWorker.predict``).
- One batch computes at a time per model, on the batcher's own thread; the next one forms
  meanwhile, and that thread takes it the moment the last one is computed. It never waits for
  the event loop between batches: when the loop handed each batch to a worker thread, the model
  sat idle ≈ 1.5 ms after every batch (≈ a third of its time on the demo image model at 32
  clients) until the loop, busy decoding the next requests, got round to the finished one. An
  idle thread is woken once the loop's current pass has queued what it read (``call_soon``), not
  by the first item: on a tiny model that keeps batches as full as before (woken per item, the
  CPU per request grew by a fifth). A thread starts with the first item (after :data:`IDLE_EXIT_S`
  idle, or a drain after ``close``, it has ended) and takes what is queued when it gets going.
- A caller cancelled while its item still waits (a client gone, a deadline passed) leaves the
  queue at once. An item whose batch already started keeps its place until the batch's answers
  are back on the event loop: :attr:`held` counts the work really in progress, so capacity
  checks never admit more than the model is doing.
- A batch that raises gives the exception to every caller in it.

Plain asyncio and one thread, unit-tested without Ray (``tests/service/inference/test_batcher.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("ray.serve")

W = TypeVar("W")
O = TypeVar("O")  # noqa: E741


@dataclass
class Done(Generic[O]):
    """One item's output and what it cost, for the answer's metrics."""

    output: O
    queue_wait_s: float
    compute_s: float
    batch_size: int  # units in the batch that computed it
    batch_id: int


@dataclass(eq=False)  # compared by identity
class _Item(Generic[W, O]):
    work: W
    size: int
    arrived: float
    future: asyncio.Future[Done[O]] = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)  # where its caller waits


RunBatch = Callable[[list[W]], list[O]]

#: an idle batch thread ends after this long without items (the next item starts another), so a
#: batcher nobody closes — or a replaced version's, restarted by a late caller — lets go of its model
IDLE_EXIT_S = 30.0


class Batcher(Generic[W, O]):
    """A queue and a thread for one model. ``run`` computes a list of works into a list of outputs
    of the same length; it runs on the batcher's thread (started by an item, ended once the queue
    is empty after :meth:`close` or after :data:`IDLE_EXIT_S` idle), so the event loop keeps
    accepting meanwhile."""

    def __init__(
        self, run: RunBatch[W, O], max_batch_size: int, wait_s: float, name: str = "batcher"
    ) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be ≥ 1 and wait_s ≥ 0, got {max_batch_size}, {wait_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.name = name
        self._lock = threading.Lock()  # the queue, the thread, closing
        self._arrival = threading.Condition(self._lock)  # an item came, or the batcher closed
        self._queue: deque[_Item[W, O]] = deque()
        self._thread: threading.Thread | None = None
        self._running = 0  # items taken into a batch and not answered yet
        self._batch_ids = itertools.count(1)
        self._closed = False
        self._idle = False  # the thread waits for items
        self._kicked = False  # a wake-up of the thread is scheduled on an event loop
        #: since when (``time.monotonic()``) the batch now computing has run; None between
        #: batches (the health check's: a batch that never returns)
        self.computing_since: float | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        """Items waiting plus items whose batch is computing or whose answers are on their way to
        the event loop: the places taken."""
        return len(self._queue) + self._running

    async def submit(self, work: W, size: int) -> Done[O]:
        """Queue ``work`` (``size`` units) and wait for its output."""
        loop = asyncio.get_running_loop()
        item = _Item(work, size, time.perf_counter(), loop.create_future(), loop)
        with self._lock:
            self._queue.append(item)
            if self._idle and not self._kicked:
                # woken once this pass of the loop has queued what it read, not per item
                self._kicked = True
                loop.call_soon(self._kick)
            if self._thread is None:  # a closed batcher's thread still drains a late caller
                thread = threading.Thread(target=self._serve, name=f"{self.name}-batches", daemon=True)
                try:
                    thread.start()
                except BaseException:
                    self._queue.remove(item)
                    raise
                self._thread = thread
        try:
            return await item.future
        except asyncio.CancelledError:
            # still queued: leave now (once taken into a batch, it stays counted until answered)
            with self._lock, contextlib.suppress(ValueError):
                self._queue.remove(item)
            raise

    def _kick(self) -> None:
        """On the loop, after the pass that queued items for an idle thread: wake it."""
        with self._lock:
            self._kicked = False
            self._arrival.notify()

    def close(self) -> None:
        """Stop after the items already queued (a replaced version drains, then lets go)."""
        with self._lock:
            self._closed = True
            self._arrival.notify()

    def _serve(self) -> None:
        """The batcher's thread: form a batch, compute it, hand its answers to the callers' event
        loop, and go straight on to the next."""
        while True:
            with self._lock:
                batch = self._next()
                if not batch:  # closed and drained, or idle too long: the next item starts another
                    self._thread = None
                    return
            try:
                self._compute(batch)
            except Exception:  # a fault of ours here: logged, and the thread goes on serving
                log.exception("%s: answering a batch failed", self.name)

    def _next(self) -> list[_Item[W, O]]:
        """The next batch (holding the lock): as soon as the queue holds a full batch or its
        oldest item has waited ``wait_s``; empty once closed with nothing queued, or after
        :data:`IDLE_EXIT_S` without items."""
        while True:
            idle_since = time.perf_counter()
            while not self._queue:
                if self._closed or time.perf_counter() - idle_since > IDLE_EXIT_S:
                    return []
                self._wait(1.0)  # a wake-up lost with a closed loop costs at most this
            deadline = self._queue[0].arrived + self.wait_s
            while self._queue and sum(i.size for i in self._queue) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wait(remaining)
            batch = self._take()
            if batch:
                return batch

    def _wait(self, timeout: float) -> None:
        """(Holding the lock.) Wait for items, at most ``timeout``: meanwhile a submitter schedules
        one wake-up (:meth:`_kick`) for the end of its loop's pass."""
        self._idle = True
        self._arrival.wait(timeout)
        self._idle = self._kicked = False

    def _take(self) -> list[_Item[W, O]]:
        """Oldest first, up to ``max_batch_size`` units; an oversized first item goes alone. Each
        is counted as running before it leaves the queue: :attr:`held`, read without the lock,
        may count it twice for a moment, never not at all."""
        batch: list[_Item[W, O]] = []
        units = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled, and its caller has not taken it out yet
                self._queue.popleft()
                continue
            if batch and units + item.size > self.max_batch_size:
                break
            self._running += 1
            batch.append(self._queue.popleft())
            units += item.size
        return batch

    def _compute(self, batch: list[_Item[W, O]]) -> None:
        start = time.perf_counter()
        units = sum(i.size for i in batch)
        batch_id = next(self._batch_ids)
        done: list[Done[O]] | None = None
        error: Exception | None = None
        self.computing_since = time.monotonic()
        try:
            outputs = self.run([i.work for i in batch])
            self.computing_since = None
            if len(outputs) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(outputs)} outputs")
            compute = time.perf_counter() - start
            done = [
                Done(o, start - i.arrived, compute, units, batch_id)
                for o, i in zip(outputs, batch, strict=True)
            ]
        except BaseException as exc:  # every caller of the batch gets the error; the thread goes on
            self.computing_since = None
            error = exc if isinstance(exc, Exception) else RuntimeError(f"the batch failed: {exc!r}")
        by_loop: dict[asyncio.AbstractEventLoop, list[int]] = {}
        for n, item in enumerate(batch):
            by_loop.setdefault(item.loop, []).append(n)
        for loop, rows in by_loop.items():
            items = [batch[n] for n in rows]
            answers = None if done is None else [done[n] for n in rows]
            try:  # one wake-up of the loop per batch
                loop.call_soon_threadsafe(self._answer, items, answers, error)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                with self._lock:
                    self._running -= len(items)

    def _answer(self, items: list[_Item[W, O]], done: list[Done[O]] | None, error: Exception | None) -> None:
        """On the callers' event loop: each item's output (or the batch's error); their places
        are free from now on."""
        with self._lock:
            self._running -= len(items)
        for n, item in enumerate(items):
            if item.future.done():  # its caller went away meanwhile
                continue
            if done is not None:
                item.future.set_result(done[n])
                continue
            assert error is not None  # a batch without answers has its error
            try:
                item.future.set_exception(error)
            except TypeError:  # an exception a future refuses (StopIteration): the others still go
                item.future.set_exception(RuntimeError(f"the batch failed: {error!r}"))
