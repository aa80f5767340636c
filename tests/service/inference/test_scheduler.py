"""The per-model translation scheduler, without Ray or ONNX Runtime: who decodes with whom and
when — every answer equal to its text decoded alone under mixed traffic, the token budget, first
in first out admission, newcomers joining and finished rows leaving in groups, answers of one
step in one wake-up, close draining. Callers that leave and steps or answers that fail are
``test_scheduler_leaving``'s. The decoder is the deterministic stand-in of ``table_decoder``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import numpy as np
import pytest

from service.inference.scheduler import TranslationScheduler
from service.inference.translation import RowBatch
from tests.service.inference.table_decoder import (
    TableDecoder,
    alone,
    mixed_jobs,
    options,
    source,
    synchronous,
)


@synchronous
async def test_mixed_traffic_answers_equal_each_text_alone() -> None:
    """Greedy and beam requests of 1–3 texts, short and long, arriving at different steps."""
    decoder = TableDecoder()
    scheduler = TranslationScheduler(decoder, token_budget=400)
    rng = random.Random(0)
    jobs = mixed_jobs(rng)

    async def one(texts: list[list[int]], beam: int):
        await asyncio.sleep(rng.random() * 0.02)
        return await scheduler.submit(texts, options(beam))

    answers = await asyncio.gather(*(one(t, b) for t, b in jobs))
    assert max(decoder.rows_per_call) > 4  # requests really shared steps
    for (texts, beam), answer in zip(jobs, answers, strict=True):
        assert len(answer.hypotheses) == len(texts)
        for ids, hyp in zip(texts, answer.hypotheses, strict=True):
            expected = alone(TableDecoder(), ids, options(beam))
            assert hyp.tokens == expected.tokens and hyp.finished == expected.finished
            assert hyp.score == pytest.approx(expected.score, abs=1e-9)
            np.testing.assert_allclose(hyp.attention, expected.attention, atol=1e-9)
    assert scheduler.held == 0 and scheduler.rows == 0 and scheduler.tokens_in_flight == 0


@synchronous
async def test_budget_bounds_what_runs_at_once() -> None:
    seen: list[int] = []
    decoder = TableDecoder()
    scheduler = TranslationScheduler(decoder, token_budget=100, on_step=lambda s, r, t, _: seen.append(t))
    rng = random.Random(1)
    texts = [source(rng, 5) for _ in range(30)]  # each holds 5 + 20 = 25 of the budget: 4 at once
    await asyncio.gather(*(scheduler.submit([t], options()) for t in texts))
    assert max(seen) <= 100
    assert max(decoder.rows_per_call) == 4


class Measured(TableDecoder):
    """Records the positions each step's batch state takes: rows × (source width + past width),
    every row padded to the widest of each."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(seconds=seconds)
        self.positions: list[int] = []

    def step(self, batch: RowBatch, *args: Any, **kwargs: Any) -> Any:
        self.positions.append(len(batch.src_mask) * (batch.src_mask.shape[1] + batch.state.mask.shape[1]))
        return super().step(batch, *args, **kwargs)


@synchronous
async def test_the_budget_bounds_the_padded_state_of_long_and_short_texts_together() -> None:
    """Each row's cache is padded to the longest past and its source to the longest source, so a
    short text beside a long one takes the long one's positions: admitted by their sum (2 for
    each short text here), 150 short texts joined a long one at step 90 and the state took 17
    times the budget."""
    decoder = Measured(seconds=0.001)
    scheduler = TranslationScheduler(decoder, token_budget=400)
    long_text = [9] * 100
    long_task = asyncio.ensure_future(scheduler.submit([long_text], options(max_len=150)))  # holds 250
    while scheduler.steps < 90:
        await asyncio.sleep(0.001)
    shorts = await asyncio.gather(*(scheduler.submit([[5]], options(max_len=1)) for _ in range(150)))
    answer = await long_task
    assert max(decoder.positions) <= 400, max(decoder.positions)
    expected = alone(TableDecoder(), long_text, options(max_len=150))
    assert answer.hypotheses[0].tokens == expected.tokens
    assert all(
        s.hypotheses[0].tokens == alone(TableDecoder(), [5], options(max_len=1)).tokens for s in shorts
    )
    assert scheduler.held == 0 and scheduler.tokens_in_flight == 0


@synchronous
async def test_a_text_over_the_whole_budget_runs_alone() -> None:
    decoder = TableDecoder()
    scheduler = TranslationScheduler(decoder, token_budget=10)
    rng = random.Random(2)
    answers = await asyncio.gather(*(scheduler.submit([source(rng, 4)], options(beam=2)) for _ in range(3)))
    assert all(a.hypotheses for a in answers)
    assert max(decoder.rows_per_call) <= 2  # one text's two beams at a time


@synchronous
async def test_short_requests_do_not_wait_for_long_ones() -> None:
    decoder = TableDecoder(seconds=0.002)
    scheduler = TranslationScheduler(decoder, token_budget=1000)
    long_task = asyncio.ensure_future(scheduler.submit([[5] * 14], options(max_len=40)))
    while decoder.calls < 3:  # the long one is decoding
        await asyncio.sleep(0.001)
    short = await scheduler.submit([[4, 6]], options())
    assert not long_task.done(), "the short request finished while the long one still decoded"
    assert short.steps < decoder.calls
    await long_task


@synchronous
async def test_admission_is_first_in_first_out() -> None:
    """A large request waiting at the head is not overtaken by a stream of small later ones."""
    decoder = TableDecoder(seconds=0.002)
    scheduler = TranslationScheduler(decoder, token_budget=60)
    first = asyncio.ensure_future(scheduler.submit([[5] * 10], options(max_len=30)))  # holds 40
    while decoder.calls < 1:
        await asyncio.sleep(0.001)
    large = asyncio.ensure_future(scheduler.submit([[6] * 10], options(max_len=30)))  # 40: must wait
    await asyncio.sleep(0)
    small = [asyncio.ensure_future(scheduler.submit([[4]], options(max_len=5))) for _ in range(10)]  # 6 each
    big = await large
    admitted_large = big.queue_wait_s
    for task in small:
        answer = await task
        # every small one arrived after the large one and was admitted no earlier
        assert answer.queue_wait_s >= admitted_large - 1e-3
    await first


@synchronous
async def test_close_drains_then_stops() -> None:
    scheduler = TranslationScheduler(TableDecoder(), token_budget=1000)
    task = asyncio.ensure_future(scheduler.submit([[5] * 6], options()))
    await asyncio.sleep(0)
    scheduler.close()
    assert (await task).hypotheses
    for _ in range(200):  # its thread ends once drained
        if not scheduler.running:
            break
        await asyncio.sleep(0.005)
    assert not scheduler.running
    # a late caller (it found the replaced version before a swap) is answered, and the thread
    # ends again: it kept the old version's sessions alive for good
    assert (await scheduler.submit([[4, 6]], options())).hypotheses
    for _ in range(200):
        if not scheduler.running:
            break
        await asyncio.sleep(0.005)
    assert not scheduler.running


@synchronous
async def test_requests_done_at_one_step_are_answered_in_one_wake_up() -> None:
    """Eight equal texts admitted together finish at the same step: the scheduler's thread wakes
    the caller loop once for all of them (each wake-up is a write to the loop's self-pipe)."""
    loop = asyncio.get_running_loop()
    wakeups = 0
    threadsafe = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return threadsafe(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    decoder = TableDecoder(seconds=0.01)  # a slow first step: all eight arrive during it
    scheduler = TranslationScheduler(decoder, token_budget=1000)
    first = asyncio.ensure_future(scheduler.submit([[9]], options(max_len=1)))
    while decoder.calls < 1:
        await asyncio.sleep(0.001)
    tasks = [asyncio.ensure_future(scheduler.submit([[5, 6, 7]], options())) for _ in range(8)]
    await first
    before = wakeups
    answers = await asyncio.gather(*tasks)
    expected = alone(TableDecoder(), [5, 6, 7], options()).tokens
    assert all(a.hypotheses[0].tokens == expected for a in answers)
    assert len({a.steps for a in answers}) == 1  # admitted together, done together
    assert wakeups - before == 1, f"eight answers of one step took {wakeups - before} wake-ups"


@synchronous
async def test_finished_rows_leave_the_batch_in_groups() -> None:
    """Taking rows out copies the whole batch's state, so a finished text's rows stay (stepped,
    ignored) until retired rows are a quarter of the batch: the batch shrinks by at least a
    quarter at a time, never row by row — and every answer is still its text's alone."""
    decoder = TableDecoder(seconds=0.005)  # all eight arrive during the first text's first step
    scheduler = TranslationScheduler(decoder, token_budget=1000)
    first = asyncio.ensure_future(scheduler.submit([[3] * 12], options()))
    while decoder.calls < 1:
        await asyncio.sleep(0.001)
    texts = [[4 + i % 7] * (i + 1) for i in range(8)]  # they finish at different steps
    answers = await asyncio.gather(*(scheduler.submit([t], options()) for t in texts), first)
    for ids, answer in zip([*texts, [3] * 12], answers, strict=True):
        assert answer.hypotheses[0].tokens == alone(TableDecoder(), ids, options()).tokens
    sizes = decoder.rows_per_call[1:]
    drops = [(a, a - b) for a, b in itertools.pairwise(sizes) if b < a]
    assert drops and all(drop * 4 >= rows for rows, drop in drops), sizes
    assert scheduler.rows == 0 and scheduler.tokens_in_flight == 0


@synchronous
async def test_under_load_newcomers_join_in_groups() -> None:
    """A full batch frees room for about one text at a time (as texts finish); admitting each at
    once would cost an encoder call and a copy of the batch per step. Newcomers join when those
    that fit are a quarter of the running rows, or four steps after the last admission."""
    decoder = TableDecoder()
    scheduler = TranslationScheduler(decoder, token_budget=8 * (9 + 20))  # about 8 texts at once
    admissions: list[tuple[int, int, int]] = []  # (step, rows decoding, texts admitted)
    encode = decoder.encode

    def recorded(rows: list[list[int]]) -> RowBatch:
        admissions.append((scheduler.steps, scheduler.rows, len(rows)))
        return encode(rows)

    decoder.encode = recorded  # type: ignore[method-assign]
    rng = random.Random(5)
    texts = [source(rng, rng.randint(2, 9)) for _ in range(60)]
    answers = await asyncio.gather(*(scheduler.submit([t], options()) for t in texts))
    for ids, answer in zip(texts, answers, strict=True):
        assert answer.hypotheses[0].tokens == alone(TableDecoder(), ids, options()).tokens
    for (before, _, _), (step, rows, joined) in itertools.pairwise(admissions):
        assert joined * 4 >= rows or step - before >= 4, admissions
