"""Admission by predicted wait (``service/inference/admission.py``): the estimate on a fake clock,
then a real translation model under sustained overload, where a request is answered in time or
refused at once — not cut off at its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from service.errors import Overloaded
from service.inference.admission import HORIZON_SHARE, Admission, Held
from service.inference.jobs import Answer, TranslateJob
from service.inference.repository import load_entry
from service.inference.worker import ModelWorker
from service.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(capacity: float = 4, timeout_s: float = 10) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission("m", capacity, timeout_s, clock=clock), clock


def keep(a: Admission, cost: float) -> tuple[Held, list[Overloaded]]:
    shed: list[Overloaded] = []
    return a.admit(cost, shed.append), shed


def drain(a: Admission, clock: Clock, held: list[Held], every_s: float) -> None:
    """Answer ``held`` in order, one each ``every_s``."""
    for h in held:
        clock.now += every_s
        a.release(h, answered=True)


def test_without_a_rate_anything_is_admitted() -> None:
    a, _ = admission()
    for _ in range(100):
        keep(a, 50)
    assert a.rate is None and a.held == 5000 and a.shed == 0


def test_the_rate_is_learned_only_while_work_waits() -> None:
    a, clock = admission(capacity=4)
    for _ in range(20):  # light load: one unit at a time, each answered in 0.5 s
        h, _ = keep(a, 1)
        clock.now += 0.5
        a.release(h, answered=True)
    assert a.rate is None  # never more than a batch held: says nothing of the model's capacity
    held = [keep(a, 1)[0] for _ in range(12)]  # saturated: 12 units against a batch of 4
    drain(a, clock, held[:6], every_s=0.25)  # 4 units/s while work waits
    assert a.rate == pytest.approx(4.0)
    assert a.predicted_s(2) == pytest.approx((6 + 2) / 4)


def test_the_wait_it_would_predict_now() -> None:
    """What the ``ray_attention_predicted_wait_seconds`` gauge shows."""
    a, clock = admission(capacity=4, timeout_s=10)
    held = [keep(a, 1)[0] for _ in range(12)]
    assert a.wait_s == 0  # no rate yet
    drain(a, clock, held[:4], every_s=0.5)  # 2 units/s, 8 held
    assert a.wait_s == pytest.approx(4.0)
    drain(a, clock, held[4:], every_s=0.5)
    assert a.wait_s == 0  # nothing waits


def test_a_request_that_would_wait_past_the_horizon_is_refused_at_once() -> None:
    a, clock = admission(capacity=4, timeout_s=10)
    held = [keep(a, 1)[0] for _ in range(12)]
    drain(a, clock, held[:4], every_s=0.5)  # 2 units/s
    assert a.rate == pytest.approx(2.0) and a.held == 8
    # the horizon: 0.8 × 10 s = 8 s of work at 2 units/s = 16 units held in all
    keep(a, 8)
    with pytest.raises(Overloaded) as refused:
        a.check(1)
    assert refused.value.http_status == 503 and refused.value.retry_after_s == 1
    assert "'m' is overloaded" in refused.value.message and "8.5 s to drain" in refused.value.message
    assert "request timeout at 10 s" in refused.value.message
    with pytest.raises(Overloaded) as far:
        keep(a, 20)  # (16 + 20) / 2 = 18 s: 10 s over the horizon, a retry after 8 s at most
    assert far.value.retry_after_s == 8 and a.held == 16 and a.shed == 2
    assert HORIZON_SHARE == 0.8


def test_while_nothing_waits_a_request_starts_at_once_whatever_the_rate() -> None:
    """A rate learned in a slow spell (another process had the cores) would otherwise refuse a
    lone request bigger than a batch for ever: refusals keep the model idle, so the rate is
    never measured again."""
    a, clock = admission(capacity=4, timeout_s=1)
    held = [keep(a, 1)[0] for _ in range(8)]
    drain(a, clock, held, every_s=1.0)  # a slow spell: 1 unit/s
    assert a.rate == pytest.approx(1.0) and a.held == 0
    big, _ = keep(a, 40)  # 40 s at that rate against a 0.8 s horizon, but nothing waits
    with pytest.raises(Overloaded):
        a.check(1)  # now work waits
    clock.now += 0.5
    a.release(big, answered=True)  # the cores are back: 40 units in 0.5 s
    assert a.rate > 10 and a.held == 0
    keep(a, 4)
    keep(a, 4)  # 8 units at the new rate: well within the horizon


def test_a_model_that_answers_nothing_for_the_horizon_refuses_work_that_would_wait() -> None:
    """Saturated for 0.8 × the timeout without an answer: whatever waits now would miss its
    deadline. A rate of 0, not none — else a model that stopped answering would admit everything
    again, each request to wait for a 504."""
    a, clock = admission(capacity=2, timeout_s=30)
    head, _ = keep(a, 1)
    burst = [keep(a, 1) for _ in range(5)]
    clock.now += 23
    a.check(1)  # 23 s without an answer: not yet
    clock.now += 1.5
    assert a.wait_s == math.inf  # the gauge reads the clock itself
    with pytest.raises(Overloaded) as refused:
        a.check(1)
    assert "answered nothing in its last 24 s of work" in refused.value.message
    assert refused.value.retry_after_s == 24
    assert not any(errors for _, errors in burst), "late shedding needs a rate above 0"
    a.release(head, answered=True)  # it answers again
    a.check(1)
    assert a.held == 5


def test_one_request_longer_than_the_rates_memory_is_not_a_stall() -> None:
    """A request bigger than a batch saturates the model alone; 12 s of it under a 30 s timeout
    is legitimate, and what comes meanwhile is admitted (there is no rate yet)."""
    a, clock = admission(capacity=100, timeout_s=30)
    big, _ = keep(a, 1000)
    for _ in range(24):
        clock.now += 0.5
        keep(a, 1)
    clock.now += 0.5
    a.release(big, answered=True)
    assert a.rate is not None and a.answered == 1000 and a.shed == 0


def test_the_oldest_request_is_never_shed_late() -> None:
    """The head of the queue is the one being computed: with a rate that makes even it late
    (one huge request after a slow spell), it is left to finish."""
    a, clock = admission(capacity=4, timeout_s=1)
    _, errors = keep(a, 40)  # no rate yet: both admitted
    small, _ = keep(a, 1)
    clock.now += 40
    a.release(small, answered=True)  # 1 unit in 40 s: the lone request would take 1,600 s
    assert a.rate == pytest.approx(1 / 40) and not errors and a.held == 40


def test_cancelled_work_does_not_count_towards_the_rate() -> None:
    a, clock = admission(capacity=2)
    held = [keep(a, 1)[0] for _ in range(10)]
    for h in held[:4]:
        clock.now += 0.25
        a.release(h, answered=False)  # cut off: the time passed, nothing was answered
    drain(a, clock, held[4:8], every_s=0.25)
    assert a.rate == pytest.approx(4 / 2.0)


def test_the_rate_outlives_a_quiet_spell() -> None:
    """A burst after an idle hour is judged by the rate of the last one."""
    a, clock = admission(capacity=2, timeout_s=5)
    drain(a, clock, [keep(a, 1)[0] for _ in range(10)], every_s=0.5)
    rate = a.rate
    assert rate == pytest.approx(2.0)
    clock.now += 3600
    assert a.rate == rate
    for _ in range(8):  # 8 units: 4 s at 2 units/s, the horizon
        keep(a, 1)
    with pytest.raises(Overloaded):
        keep(a, 1)


def test_the_rate_follows_the_last_saturated_seconds() -> None:
    a, clock = admission(capacity=1, timeout_s=100)
    drain(a, clock, [keep(a, 1)[0] for _ in range(40)], every_s=0.5)  # 20 s at 2 units/s
    assert a.rate == pytest.approx(2.0)
    drain(a, clock, [keep(a, 1)[0] for _ in range(60)], every_s=0.1)  # 6 s at 10 units/s
    assert a.rate == pytest.approx((4 * 2 + 6 * 10) / 10, rel=0.1)  # the last 10 saturated seconds


def test_a_burst_admitted_before_the_rate_was_known_is_shed_newest_first() -> None:
    """A new replica's first burst is admitted by count; once the rate is known, the requests
    whose deadlines the work ahead would pass are shed at once, the newest first."""
    a, clock = admission(capacity=4, timeout_s=10)
    burst = [keep(a, 1) for _ in range(40)]
    assert a.rate is None
    for h, _ in burst[:2]:  # 2 units/s: 38 held would take 19 s, the last would miss by ~9 s
        clock.now += 0.5
        a.release(h, answered=True)
    shed = [i for i, (_, errors) in enumerate(burst) if errors]
    assert shed and shed == list(range(40 - len(shed), 40)), "the newest, in one run"
    # what is left drains within the deadline (the batch in progress counted as done)
    assert (a.held - 4) / 2.0 <= 10 - 1.0 and a.held == 38 - len(shed)
    error = burst[-1][1][0]
    assert error.http_status == 503 and "past its deadline" in error.message
    assert all(len(errors) == 1 for _, errors in burst[-len(shed) :]), "each shed once"
    a.release(burst[-1][0], answered=False)  # its caller's own release, later: nothing more
    assert a.held == 38 - len(shed) and a.shed == len(shed)


def test_a_request_admitted_without_a_shed_is_never_shed_later() -> None:
    """A stream's caller waits outside its computation too (writing what it has): it is refused
    when it comes, never shed later; older requests are judged with its work behind them."""
    a, clock = admission(capacity=4, timeout_s=10)
    burst = [keep(a, 1) for _ in range(39)]
    stream = a.admit(1, None)
    for h, _ in burst[:2]:
        clock.now += 0.5
        a.release(h, answered=True)
    shed = [i for i, (_, errors) in enumerate(burst) if errors]
    assert shed == list(range(39 - len(shed), 39)) and len(shed) > 5
    assert a.held == 38 - len(shed)  # the stream's unit still held
    a.release(stream, answered=True)
    assert a.held == 37 - len(shed)


def test_a_timeout_is_required() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Admission("m", 4, 0)


# -- a real model ---------------------------------------------------------------------------------

TEXTS = ["Samstag, 15. Mai 1976", "3 juin 1980", "31.12.1999", "1 mai 2001"] * 16
HEAVY = TranslateJob(TEXTS, beam_size=8)
STREAMED = TranslateJob(TEXTS * 2)  # greedy: its tokens stream as they are chosen


@pytest.mark.parametrize("decode_process", [False, True])
def test_a_stream_gives_its_work_back_once_decoded_and_counts_it_answered(
    tiny_repository: Path, decode_process: bool
) -> None:
    """A client that reads its tokens slowly held the stream's units until it had read the last:
    the model looked saturated while it answered nothing, and the rate it learned fell."""
    settings = Settings(repository=tiny_repository, decode_process=decode_process)
    worker = ModelWorker(load_entry(tiny_repository, "dates-transformer", 1), settings, "replica", "node")

    async def prompt_reader() -> None:
        for _ in range(3):
            async with contextlib.aclosing(worker.stream(STREAMED)) as events:
                items = [event async for event in events]
            assert isinstance(items[-1], Answer)

    async def slow_reader() -> None:
        async with contextlib.aclosing(worker.stream(STREAMED)) as events:
            first = await anext(events)
            deadline = time.perf_counter() + 20
            while worker.admission.held and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)  # reading nothing meanwhile
            assert worker.admission.held == 0, "still held after the decode"
            worker.refresh_metrics()  # the health check's: the gauge reads what the admission says
            items = [first, *[event async for event in events]]
        assert isinstance(items[-1], Answer) and len(items) > 1

    try:
        asyncio.run(slow_reader())
        answered = worker.admission.answered
        assert answered > 0
        # read at once: the scheduler wakes the reader with its last tokens before the future's
        # callbacks run, and the generator closed with the units not counted as answered
        asyncio.run(prompt_reader())
        assert worker.admission.answered > answered and worker.admission.held == 0
    finally:
        worker.close()


@pytest.mark.slow
@pytest.mark.parametrize("decode_process", [False, True])
def test_sustained_overload_is_answered_in_time_or_refused_at_once(
    tiny_repository: Path, decode_process: bool
) -> None:
    """40 clients send 64 texts at beam 8, or stream 128 greedy ones, back to back (each retries
    a refusal 0.2 s later) against a 2 s timeout: seconds of work queued for each. Counting
    requests, the model let them all in and most were cut off at 2 s (DEADLINE_EXCEEDED) after
    holding rows of the batch; predicting the wait, a request is answered within its timeout or
    refused at once (a stream when it comes: it is not shed once admitted)."""
    timeout_s = 2.0
    settings = Settings(
        repository=tiny_repository, decode_process=decode_process, limits={"request_timeout_s": timeout_s}
    )  # type: ignore[arg-type]
    worker = ModelWorker(load_entry(tiny_repository, "dates-transformer", 1), settings, "replica", "node")
    outcomes: Counter[str] = Counter()
    refusals: list[float] = []

    async def streamed() -> None:
        async with contextlib.aclosing(worker.stream(STREAMED)) as events:
            async for event in events:
                last = event
        assert isinstance(last, Answer)

    async def client(i: int, until: float) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):  # as the server applies it
                    await (streamed() if i % 2 else worker.predict(HEAVY))
                outcomes["answered"] += 1
            except TimeoutError:
                outcomes["timed out"] += 1
            except Overloaded:
                outcomes["refused"] += 1
                refusals.append(time.perf_counter() - start)
                await asyncio.sleep(0.2)

    async def load() -> None:
        until = time.perf_counter() + 10
        await asyncio.gather(*(client(i, until) for i in range(40)))

    try:
        asyncio.run(load())
    finally:
        worker.close()
    assert outcomes["answered"] >= 10 and outcomes["refused"] >= 40, outcomes
    # a few may still miss: the rate moves (another process takes the cores, a stream's texts
    # outlast a beam's): 0 in most runs, 14 with a CPU hog beside it, 28 for 127 answered in a
    # CI run beside other test runs. Counting requests, 192 of 215 did (20 answered)
    assert outcomes["timed out"] <= 0.5 * outcomes["answered"], outcomes
    refusals.sort()
    assert refusals[len(refusals) // 2] < 0.05, (
        f"refused at once: {refusals[len(refusals) // 2]} s, {outcomes}"
    )
    assert worker.admission.held == 0
