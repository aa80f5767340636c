"""The per-model translation scheduler when a request leaves without its answer, without Ray or
ONNX Runtime: a caller cancelling (between steps, during one, the last one), a step that fails
its batch, an answer that fails to build. What leaves must take its rows and give back its
budget, and the others are answered as their texts alone. The decoder is the deterministic
stand-in of ``table_decoder``; the scheduler's other tests are ``test_scheduler``'s.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from service.inference.decoding import GreedySearch
from service.inference.scheduler import TranslationScheduler
from service.inference.translation import RowBatch
from tests.service.inference.table_decoder import EOS, TableDecoder, alone, options, synchronous


@synchronous
async def test_cancelled_request_leaves_the_batch_at_the_next_step() -> None:
    rows: list[int] = []
    decoder = TableDecoder(seconds=0.002)
    scheduler = TranslationScheduler(decoder, token_budget=1000, on_step=lambda s, r, t, _: rows.append(r))
    gone = asyncio.ensure_future(scheduler.submit([[7] * 14, [8] * 14], options(beam=3, max_len=40)))
    stays = asyncio.ensure_future(scheduler.submit([[9] * 14], options(max_len=40)))
    while decoder.calls < 3:
        await asyncio.sleep(0.001)
    before = scheduler.rows
    gone.cancel()
    calls = decoder.calls
    while decoder.calls < calls + 2:
        await asyncio.sleep(0.001)
    assert scheduler.rows == 1 < before  # only the remaining request's row
    answer = await stays
    expected = alone(TableDecoder(), [9] * 14, options(max_len=40))
    assert answer.hypotheses[0].tokens == expected.tokens
    assert scheduler.tokens_in_flight == 0 and scheduler.held == 0


@synchronous
async def test_the_last_caller_leaving_is_reported_without_a_step() -> None:
    """When the only request's caller leaves, its rows go without another step: the metrics hook
    still hears of it (0 rows stepped, 0 rows and 0 tokens in flight), else the rows-in-flight
    gauge would show the departed rows until the next request."""
    seen: list[tuple[int, int, int]] = []
    decoder = TableDecoder(seconds=0.002)
    scheduler = TranslationScheduler(
        decoder, token_budget=1000, on_step=lambda s, r, t, _: seen.append((s, r, t))
    )
    gone = asyncio.ensure_future(scheduler.submit([[7] * 14], options(max_len=40)))
    while decoder.calls < 3:
        await asyncio.sleep(0.001)
    gone.cancel()
    while scheduler.rows or scheduler.held:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.02)
    assert seen[0][1] == 1 and seen[-1] == (0, 0, 0), seen


class HeldWhenItEnds(TableDecoder):
    """Stops inside the step at which the text with source ``ids`` chooses EOS, until ``go``:
    what its caller's loop does meanwhile happens while the stepping thread is in the graph."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.source = float(sum(ids))
        self.inside, self.go = threading.Event(), threading.Event()

    def step(self, batch: RowBatch, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, RowBatch]:
        logp, attention, out = super().step(batch, *args, **kwargs)
        sources = (batch.tensors["memory"][..., 0] * batch.src_mask).sum(axis=1)
        ends = (sources == self.source) & (logp.argmax(axis=1) == EOS)
        if ends.any() and not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(10)
        return logp, attention, out


@synchronous
async def test_a_caller_leaving_during_a_step_gives_back_its_budget() -> None:
    """A caller leaves (on its loop) while the stepping thread is in the graph, at the step where
    another text ends: that step's compaction takes the leaver's rows out, and must give back
    its budget too. Held budget that nobody decodes would shrink every later batch, down to one
    text at a time."""
    short, long = [5, 5], [9] * 14
    decoder = HeldWhenItEnds(short)
    scheduler = TranslationScheduler(decoder, token_budget=1000)
    leaves = asyncio.ensure_future(scheduler.submit([long], options(max_len=40)))
    while decoder.calls < 1:
        await asyncio.sleep(0.001)
    stays = asyncio.ensure_future(scheduler.submit([short], options(max_len=40)))
    while not decoder.inside.is_set():
        await asyncio.sleep(0.001)
    leaves.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaves  # its release has run: the request is marked as left
    decoder.go.set()
    answer = await stays
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), short, options(max_len=40)).tokens
    calls = decoder.calls
    await asyncio.sleep(0.05)
    assert decoder.calls == calls, "nothing left to decode"
    assert scheduler.rows == 0 and scheduler.held == 0
    assert scheduler.tokens_in_flight == 0


@synchronous
async def test_a_failing_step_fails_its_batch_and_the_loop_goes_on() -> None:
    decoder = TableDecoder(fail_on=2)
    steps: list[tuple[int, int, int]] = []
    scheduler = TranslationScheduler(decoder, token_budget=1000, on_step=lambda *a: steps.append(a[:3]))
    with pytest.raises(RuntimeError, match="graph failed"):
        await scheduler.submit([[5, 6, 7]], options())
    await asyncio.sleep(0.05)
    assert steps[-1] == (0, 0, 0), "the rows and budget gauges kept the failed batch's"
    answer = await scheduler.submit([[5, 6, 7]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6, 7], options()).tokens
    assert scheduler.tokens_in_flight == 0


class CopyFails(RowBatch):
    """A step's state whose first copy to fewer rows fails, as a device copy out of memory."""

    failed = False

    def __getitem__(self, index: np.ndarray) -> RowBatch:
        if not CopyFails.failed and len(index) < len(self):
            CopyFails.failed = True
            raise MemoryError("the copy of the batch's state failed")
        return super().__getitem__(index)


@synchronous
async def test_a_failed_copy_of_the_state_answers_what_finished_and_fails_the_rest() -> None:
    """The short text finishes, and taking its row out of the batch fails: its request is whole
    and answered (it waited for its deadline before), the long one gets the error, nothing is held."""

    class Decoder(TableDecoder):
        def step(self, batch: RowBatch, *args: Any, **kwargs: Any) -> Any:
            logp, attention, state = super().step(batch, *args, **kwargs)
            return logp, attention, CopyFails(state.src_mask, state.tensors, state.state)

    scheduler = TranslationScheduler(Decoder(), token_budget=1000)
    short = asyncio.ensure_future(scheduler.submit([[5, 5]], options(max_len=40)))
    long = asyncio.ensure_future(scheduler.submit([[9] * 14], options(max_len=40)))
    await asyncio.wait([short, long], timeout=5)
    assert CopyFails.failed and short.done() and long.done()
    assert short.result().hypotheses[0].tokens == alone(TableDecoder(), [5, 5], options(max_len=40)).tokens
    assert isinstance(long.exception(), MemoryError)
    assert scheduler.held == 0 and scheduler.tokens_in_flight == 0 and scheduler.rows == 0


@synchronous
async def test_an_answer_that_fails_to_build_fails_its_request_alone() -> None:
    """Answers are built on the caller's loop, several in one callback: one that raises (here the
    hypothesis of a 4-token source) fails that request with its error; the others are answered."""
    built = GreedySearch.result

    def result(self: GreedySearch) -> Any:
        if self.source.stop == 4:
            raise ValueError("cannot build this one")
        return built(self)

    GreedySearch.result = result  # type: ignore[method-assign]
    try:
        scheduler = TranslationScheduler(TableDecoder(), token_budget=1000)
        texts = [[5, 6, 7], [5, 6, 7, 8], [5, 6, 7]]
        results = await asyncio.gather(
            *(scheduler.submit([t], options()) for t in texts), return_exceptions=True
        )
    finally:
        GreedySearch.result = built  # type: ignore[method-assign]
    assert isinstance(results[1], ValueError)
    expected = alone(TableDecoder(), [5, 6, 7], options()).tokens
    assert [r.hypotheses[0].tokens for r in (results[0], results[2])] == [expected, expected]  # type: ignore[union-attr]


@synchronous
async def test_an_advance_that_fails_part_way_fails_every_request_it_stepped() -> None:
    """The short text finishes, then the step's advance fails on the long one: the short request
    (its last text done, not answered) fails with the rest — it was left out and waited for its
    deadline — and nothing is held."""
    choose, state = GreedySearch.choose, {"done": False}

    def failing(self: GreedySearch, *args: Any) -> Any:
        if state["done"]:
            state["done"] = False
            raise MemoryError("a copy of this step's attention failed")
        kept = choose(self, *args)
        state["done"] = self.done and len(self.tokens) < 20  # the short one, done at this step
        return kept

    GreedySearch.choose = failing  # type: ignore[method-assign]
    try:
        scheduler = TranslationScheduler(TableDecoder(), token_budget=1000)
        short = asyncio.ensure_future(scheduler.submit([[5, 5]], options(max_len=3)))
        long = asyncio.ensure_future(scheduler.submit([[9] * 14], options(max_len=40)))
        await asyncio.wait([short, long], timeout=5)
    finally:
        GreedySearch.choose = choose  # type: ignore[method-assign]
    assert short.done() and long.done(), "a request was neither answered nor failed"
    assert isinstance(short.exception(), MemoryError) and isinstance(long.exception(), MemoryError)
    assert scheduler.held == 0 and scheduler.tokens_in_flight == 0 and scheduler.rows == 0
