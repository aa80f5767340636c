"""What crosses between the serving process and its decode child
(``service/inference/decode_process.py``): answers under concurrent mixed traffic, streamed
tokens and the stream interval, a caller that leaves, a failing step, and requests larger than
the socket's buffer — handed to a writer thread, lost with a child that dies, refused while too
many bytes wait for the child.

The child runs the deterministic stand-in decoder of ``table_decoder`` (built by a module-level
factory of ``decode_stand_ins``, as the service builds the model's Translator), so every answer
can be compared with the same text decoded alone in this process. Real processes, real sockets.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from service.errors import InferenceFailed, Overloaded
from service.inference import decode_process
from service.inference.decode_process import DecodeProcess
from service.inference.scheduler import TranslationScheduler
from tests.service.inference.decode_stand_ins import (
    alive,
    failing,
    kill,
    slow,
    slow_failing,
    sluggish,
    table,
    until,
)
from tests.service.inference.table_decoder import (
    BOS,
    EOS,
    TableDecoder,
    alone,
    mixed_jobs,
    options,
    source,
    synchronous,
)


@synchronous
async def test_concurrent_mixed_answers_equal_each_text_alone() -> None:
    steps: list[tuple[int, int, int]] = []
    process = DecodeProcess(table, token_budget=400, on_step=lambda r, live, t, _: steps.append((r, live, t)))
    assert process.providers == ["TableDecoder"] and process.running
    rng = random.Random(1)
    jobs = mixed_jobs(rng)

    async def one(texts: list[list[int]], beam: int):
        await asyncio.sleep(rng.random() * 0.02)
        return await process.submit(texts, options(beam))

    answers = await asyncio.gather(*(one(t, b) for t, b in jobs))
    for (texts, beam), answer in zip(jobs, answers, strict=True):
        assert len(answer.hypotheses) == len(texts)
        for ids, hyp in zip(texts, answer.hypotheses, strict=True):
            expected = alone(TableDecoder(), ids, options(beam))
            assert hyp.tokens == expected.tokens and hyp.finished == expected.finished
            assert hyp.score == pytest.approx(expected.score, abs=1e-9)
            np.testing.assert_allclose(hyp.attention, expected.attention, atol=1e-9)
        assert answer.queue_wait_s >= 0 and answer.compute_s > 0 and answer.steps > 0
    assert max(r for r, _, _ in steps) > 4  # requests shared steps in the child
    await until(lambda: process.rows == 0)  # the last pass's counts arrive when the child idles
    assert process.held == 0 and process.tokens_in_flight == 0 and steps[-1][1:] == (0, 0)
    pid = process.pid
    assert pid is not None
    process.close()
    await until(lambda: not alive(pid))


@synchronous
async def test_streamed_tokens_arrive_before_the_answer_and_attention_only_when_asked() -> None:
    process = DecodeProcess(table, token_budget=400)
    ids = [5, 7, 9, 3]
    expected = alone(TableDecoder(), ids, options())
    for attention in (True, False):
        got: list = []
        request = process.enqueue([ids], options(), got.extend, attention)
        try:
            answer = await request.future
        finally:
            process.release(request)
        await asyncio.sleep(0)
        tokens = [t.token for t in got]
        assert tokens == [*expected.tokens, EOS][: len(tokens)] and len(tokens) == len(expected.tokens) + 1
        assert BOS not in tokens
        if attention:
            np.testing.assert_allclose(np.stack([t.attention[: len(ids)] for t in got]), expected.attention)
            np.testing.assert_allclose(answer.hypotheses[0].attention, expected.attention)
        else:  # nothing copied across that nobody reads
            assert all(t.attention is None for t in got) and answer.hypotheses[0].attention.size == 0
        assert answer.hypotheses[0].tokens == expected.tokens
    process.close()


@pytest.mark.parametrize("where", ["decode-process", "thread"])
def test_tokens_within_the_interval_are_held_where_they_are_chosen(where: str) -> None:
    """With ``interval_s`` the scheduler calls a stream's ``on_tokens`` at most once per interval
    — in a decode process the held tokens never cross to the parent, on a thread they never wake
    the caller's loop — the first token at once and the last ones in the answer's own wake-up
    (written together); each text's tokens are those of the step-by-step stream (two texts
    ending at different steps). A failed request gets the tokens it held before its error."""
    long, short = [3, 4, 5, 6, 7, 8, 9, 10, 11] * 2, [5, 7, 9, 3, 4, 6]
    opts, interval = options(max_len=40), 0.05  # ≈ 5 steps: robust to slower steps

    def scheduler(failing: bool = False) -> DecodeProcess | TranslationScheduler:
        if where == "decode-process":
            return DecodeProcess(slow_failing if failing else slow, 400)
        return TranslationScheduler(TableDecoder(fail_on=6 if failing else None, seconds=0.01), 400)

    @synchronous
    async def go() -> None:
        loop = asyncio.get_running_loop()
        s = scheduler()
        calls: list[tuple[float, int]] = []  # (s since the request, tokens) per call
        answered_with: list[bool] = []  # per call: the answer was settled in the same wake-up
        got: list = []

        def on_tokens(tokens: list) -> None:
            calls.append((time.perf_counter() - start, len(tokens)))
            got.extend(tokens)
            loop.call_soon(lambda: answered_with.append(request.future.done()))

        start = time.perf_counter()
        request = s.enqueue([long, short], opts, on_tokens, True, interval)
        try:
            answer = await request.future
            answered = time.perf_counter() - start
        finally:
            s.release(request)
        s.close()
        for i, ids in enumerate([long, short]):
            expected = alone(TableDecoder(), ids, opts)
            assert [t.token for t in got if t.text == i] == [*expected.tokens, EOS]
            assert answer.hypotheses[i].tokens == expected.tokens
        assert calls[0][1] == 2, "the first tokens (one per text) go at once"
        assert answer.steps >= 15 and len(calls) <= answered / interval + 2 < answer.steps, (
            calls,
            answer.steps,
        )
        gaps = np.diff([t for t, _ in calls[:-1]])  # the last call comes with the answer
        # the interval is the scheduler's: this loop adds its own jitter to each call
        assert np.median(gaps) >= interval * 0.9 and gaps.min() >= interval / 2, calls
        assert answered_with[-1] and not any(answered_with[:-1])

        s = scheduler(failing=True)  # its 6th step fails: 5 tokens chosen, 1 sent at once
        failed: list = []
        request = s.enqueue([long], opts, failed.extend, True, 1.0)
        try:
            with pytest.raises((RuntimeError, InferenceFailed)):
                await request.future
        finally:
            s.release(request)
        s.close()
        await asyncio.sleep(0)
        assert [t.token for t in failed] == alone(TableDecoder(), long, opts).tokens[:5]

    go()


@synchronous
async def test_a_caller_that_leaves_frees_its_rows_and_others_are_unaffected() -> None:
    process = DecodeProcess(slow, token_budget=10_000)
    long = options(max_len=200)
    keep_ids = [4, 4, 6]
    leaving = asyncio.create_task(process.submit([[3] * 30], long))
    kept = asyncio.create_task(process.submit([keep_ids], options()))
    await until(lambda: process.rows >= 1)
    leaving.cancel()
    answer = await kept
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), keep_ids, options()).tokens
    await until(lambda: process.rows == 0 and process.held == 0)
    stopped = process.steps
    await asyncio.sleep(0.1)
    assert process.steps == stopped, "the child kept stepping for nobody"
    process.close()


@synchronous
async def test_a_failing_step_fails_its_requests_with_the_error_type_and_the_child_serves_on() -> None:
    process = DecodeProcess(failing, token_budget=400)
    with pytest.raises(RuntimeError, match="the graph failed") as failed:
        await process.submit([[5, 6, 7, 8]], options())
    assert type(failed.value).__name__ == "RuntimeError"
    answer = await process.submit([[5, 6]], options())
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), [5, 6], options()).tokens
    process.close()


@synchronous
async def test_a_request_larger_than_the_socket_buffer_never_blocks_the_event_loop() -> None:
    """The child reads only between steps. A request of many long texts (megabytes pickled, over
    the socket's buffer) sent during a long step is handed to a writer thread instead of blocking
    the caller's event loop — every model of the replica — until the step ends; what follows it
    (another request, a release) keeps its order, and every answer is the text's alone."""
    rows: list[int] = []
    process = DecodeProcess(sluggish, token_budget=10_000_000, on_step=lambda r, *_: rows.append(r))
    rng = random.Random(7)
    small = [source(rng, 3)]
    first = asyncio.create_task(process.submit(small, options(max_len=2)))
    await until(lambda: process.steps >= 1 or process.rows >= 1, 5)  # the child is in a 0.5 s step
    big = [source(rng, 3000) for _ in range(200)]  # ≈ 1.2 MB pickled
    start = time.perf_counter()
    request = process.enqueue(big, options(max_len=1))
    gone = process.enqueue(big, options(max_len=1))  # queued behind it; its caller leaves at once
    process.release(gone)
    after = process.enqueue(small, options(max_len=1))
    took = time.perf_counter() - start
    assert took < 0.1, f"enqueue blocked the event loop for {took:.2f} s"
    assert (await first).hypotheses[0].tokens == alone(TableDecoder(), small[0], options(max_len=2)).tokens
    answer = await request.future
    for i in (0, 99, 199):
        assert answer.hypotheses[i].tokens == alone(TableDecoder(), big[i], options(max_len=1)).tokens
    assert (await after.future).hypotheses[0].tokens == alone(
        TableDecoder(), small[0], options(max_len=1)
    ).tokens
    process.release(request)
    process.release(after)
    await until(lambda: process.held == 0 and process.rows == 0, 10)
    assert max(rows) <= len(big) + 2, "the released request was decoded: its release overtook it"
    process.close()


@synchronous
async def test_a_child_that_dies_while_a_large_request_waits_to_be_written() -> None:
    """The writer thread is blocked on a full socket when the child dies: the request fails as
    the others held, nothing of it reaches the restarted child, which serves the next one."""
    process = DecodeProcess(sluggish, token_budget=10_000_000)
    rng = random.Random(8)
    sources = [source(rng, 3000) for _ in range(200)]  # made before the step: its 0.5 s is the window
    first = asyncio.create_task(process.submit([source(rng, 3)], options(max_len=5)))
    await until(lambda: process.steps >= 1 or process.rows >= 1, 5)
    waiting = process.enqueue(sources, options(max_len=1))
    assert process._conn is not None and process._conn.waiting == 1  # in the writer's hands
    dead = kill(process)
    for held in (first, waiting.future):
        with pytest.raises(InferenceFailed, match="decoder process exited"):
            await held
    await until(lambda: process.pid != dead and process.running, 10)
    ids = [5, 6]
    answer = await process.submit([ids], options(max_len=3))
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), ids, options(max_len=3)).tokens
    assert process.held == 0
    process.close()


@synchronous
async def test_requests_are_refused_while_too_many_bytes_wait_for_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What waits for a child in a long step (or hung) is bounded: past MAX_WAITING_BYTES unread,
    new requests get 503 (Overloaded); once the child reads, they are taken again."""
    monkeypatch.setattr(decode_process, "MAX_WAITING_BYTES", 500_000)  # ~1 MB will wait
    process = DecodeProcess(sluggish, token_budget=10_000_000)
    rng = random.Random(9)
    sources = [source(rng, 3000) for _ in range(200)]  # made before the step: its 0.5 s is the window
    first = asyncio.create_task(process.submit([source(rng, 3)], options(max_len=2)))
    await until(lambda: process.steps >= 1 or process.rows >= 1, 5)
    big = process.enqueue(sources, options(max_len=1))
    with pytest.raises(Overloaded, match="bytes of requests unread"):
        process.enqueue([[5, 6]], options())
    await first
    await big.future
    ids = [5, 6]
    answer = await process.submit([ids], options(max_len=3))
    assert answer.hypotheses[0].tokens == alone(TableDecoder(), ids, options(max_len=3)).tokens
    process.release(big)
    process.close()
