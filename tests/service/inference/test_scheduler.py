"""The per-model translation scheduler, without Ray or ONNX Runtime.

The decoder here is a deterministic numpy stand-in with the ``transformer-kv-layers`` shapes (one layer): its
"encoder" keeps the source ids (right-padded, like a real batch), its cache holds the tokens each
row fed (left-padded, masked), and a row's logits depend only on its own source, its own unmasked
past and its position. So a row mixed up with another, a cache reordered wrongly for a beam, or
a padding column read would change that request's answer against the same text decoded alone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from service.inference.decoding import GreedySearch, Options, new_search, run_searches
from service.inference.scheduler import TranslationScheduler
from service.inference.translation import KVCache, RowBatch

V, BOS, EOS = 12, 1, 2


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on its own event loop, with a 20 s limit (a hang fails, not stalls);
    pytest's fixtures pass through."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 20))

    return run


class TableDecoder:
    def __init__(self, fail_on: int | None = None, seconds: float = 0.0) -> None:
        """``seconds``: how long a step takes (a test that acts between steps needs them slow;
        the scheduler steps on its own thread, back to back)."""
        self.calls = 0
        self.rows_per_call: list[int] = []
        self.fail_on = fail_on
        self.seconds = seconds

    def encode(self, rows: list[list[int]]) -> RowBatch:
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width, 1), dtype=np.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r), 0] = r
        mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
        empty = np.zeros((len(rows), 1, 0, 1), dtype=np.float32)
        cache = KVCache({"past_keys.0": empty, "past_values.0": empty}, np.zeros((len(rows), 0), dtype=bool))
        return RowBatch(mask, {"memory": ids}, cache)

    def step(
        self,
        batch: RowBatch,
        tokens: np.ndarray,
        positions: np.ndarray,
        prefixes: np.ndarray | None,
        candidates: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, RowBatch]:
        time.sleep(self.seconds)
        self.calls += 1
        self.rows_per_call.append(len(tokens))
        if self.fail_on == self.calls:
            raise RuntimeError("the graph failed")
        cache: KVCache = batch.state
        keys = cache.tensors["past_keys.0"]
        assert len(keys) == len(tokens) == len(batch.src_mask) == len(positions)
        source = (batch.tensors["memory"][..., 0] * batch.src_mask).sum(axis=1)  # (N,)
        length = batch.src_mask.sum(axis=1)
        past = (keys[:, 0, :, 0] * cache.mask).sum(axis=1)  # (N,)
        held = cache.mask.sum(axis=1)
        retired = tokens == 0  # a finished text's rows awaiting compaction: fed 0 at position 0
        assert ((held == positions) | retired).all(), "a row's cache must hold exactly its own past"
        seed = source * 7.1 + past * 3.3 + tokens * 1.7 + positions * 0.9
        logits = np.sin(seed[:, None] * (np.arange(V)[None, :] + 1.3)) * 2.0
        logits[:, EOS] += np.where(positions >= length, 3.0, -1.0)  # stop around the source length
        logits[:, BOS] = -9.0
        attention = batch.src_mask / length[:, None]  # (N, S)
        attention = attention * (1 + 0.01 * positions[:, None])
        new = tokens.astype(np.float32).reshape(-1, 1, 1, 1)
        state = KVCache(
            {k: np.concatenate([v, new], axis=2) for k, v in cache.tensors.items()},
            np.concatenate([cache.mask, np.ones((len(tokens), 1), dtype=bool)], axis=1),
        )
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logp, attention, RowBatch(batch.src_mask, batch.tensors, state)


def alone(decoder: TableDecoder, ids: list[int], options: Options):
    """The text decoded by itself in a static batch of one."""

    def step(owners, prefixes, batch, t):
        return decoder.step(batch, prefixes[:, -1], np.full(len(owners), t, dtype=np.int64), prefixes)

    search = new_search(BOS, EOS, options.max_len, options.beam_size, options.length_penalty, len(ids))
    [hyp] = run_searches(step, [search], decoder.encode([ids]))
    return hyp


def options(beam: int = 1, max_len: int = 20) -> Options:
    return Options(BOS, EOS, max_len, beam, 0.0)


def source(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(3, 11) for _ in range(n)]


def mixed_jobs(rng: random.Random, count: int = 40) -> list[tuple[list[list[int]], int]]:
    """``count`` requests of 1–3 texts, short and long, each with its beam (greedy half the time)."""
    return [
        ([source(rng, rng.choice([2, 3, 9, 14])) for _ in range(rng.randint(1, 3))], rng.choice([1, 1, 2, 4]))
        for _ in range(count)
    ]


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
async def test_a_failing_step_fails_its_batch_and_the_loop_goes_on() -> None:
    decoder = TableDecoder(fail_on=2)
    scheduler = TranslationScheduler(decoder, token_budget=1000)
    with pytest.raises(RuntimeError, match="graph failed"):
        await scheduler.submit([[5, 6, 7]], options())
    answer = await scheduler.submit([[5, 6, 7]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6, 7], options()).tokens
    assert scheduler.tokens_in_flight == 0


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
