"""Dynamic batching per model: one queue, one loop, one batch size — owned by the model's worker.

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
- One batch computes at a time per model; the next one forms meanwhile.
- A caller cancelled while its item still waits (a client gone, a deadline passed) leaves the
  queue at once. An item whose batch already started keeps its place until the batch has
  finished computing: :attr:`held` counts the work really in progress, so capacity checks never
  admit more than the model is doing.
- A batch that raises gives the exception to every caller in it.

Plain asyncio, unit-tested without Ray (``tests/service/inference/test_batcher.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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


RunBatch = Callable[[list[W]], Awaitable[list[O]]]


class Batcher(Generic[W, O]):
    """A queue and a loop for one model. ``run`` computes a list of works into a list of outputs
    of the same length (typically in a worker thread, so the event loop keeps accepting)."""

    def __init__(self, run: RunBatch[W, O], max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be ≥ 1 and wait_s ≥ 0, got {max_batch_size}, {wait_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: deque[_Item[W, O]] = deque()
        self._arrival = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running = 0  # items in the batch computing now
        self._batch_ids = itertools.count(1)
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        """Items waiting plus items whose batch is computing: the places taken."""
        return len(self._queue) + self._running

    async def submit(self, work: W, size: int) -> Done[O]:
        """Queue ``work`` (``size`` units) and wait for its output."""
        item = _Item(work, size, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._arrival.set()
        self._ensure_loop()
        try:
            return await item.future
        except asyncio.CancelledError:
            # still queued: leave now (once its batch started, it stays counted until it ends)
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            raise

    def close(self) -> None:
        """Stop after the items already queued (a replaced version drains, then lets go)."""
        self._closed = True
        self._arrival.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._closed = False  # a late caller of a replaced version is still answered
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._arrival.clear()
                await self._arrival.wait()
            await self._fill()
            batch = self._take()
            if batch:
                await self._compute(batch)

    async def _fill(self) -> None:
        """Wait until a batch is full or the oldest item has waited ``wait_s``."""
        deadline = self._queue[0].arrived + self.wait_s
        while self._queue and sum(i.size for i in self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrival.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), remaining)

    def _take(self) -> list[_Item[W, O]]:
        """Oldest first, up to ``max_batch_size`` units; an oversized first item goes alone."""
        batch: list[_Item[W, O]] = []
        units = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if batch and units + item.size > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            units += item.size
        return batch

    async def _compute(self, batch: list[_Item[W, O]]) -> None:
        self._running = len(batch)
        start = time.perf_counter()
        units = sum(i.size for i in batch)
        batch_id = next(self._batch_ids)
        try:
            outputs = await self.run([i.work for i in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(outputs)} outputs")
        except asyncio.CancelledError:  # the loop itself is stopping: nobody will answer these
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:  # every caller of the batch gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running = 0
        compute = time.perf_counter() - start
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():  # its caller may have gone meanwhile
                item.future.set_result(Done(output, start - item.arrived, compute, units, batch_id))
