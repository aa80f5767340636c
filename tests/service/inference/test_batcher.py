"""The per-model batcher, without Ray: batches fill up to their size or their wait, never mix two
batchers' items, give an oversized item a batch of its own, let cancelled waiters go, keep the
place of work that is computing, and give a batch's failure to every caller in it; its thread
goes from batch to batch without the event loop, wakes once per pass of the loop, survives any
failure of ``run``, and ends when closed and drained or idle."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from service.inference import batcher as batcher_module
from service.inference.batcher import Batcher


class Model:
    """A fake model that records its batches and answers (its name, the work); it runs on the
    batcher's thread, as a real one does."""

    def __init__(self, name: str, delay_s: float = 0.0, fail: bool = False) -> None:
        self.name, self.delay_s, self.fail = name, delay_s, fail
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def run(self, works: list[Any]) -> list[tuple[str, Any]]:
        self.batches.append(list(works))
        self.threads.add(threading.current_thread().name)
        assert self.release.wait(10)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        return [(self.name, w) for w in works]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


async def ended(batcher: Batcher[Any, Any], within_s: float) -> bool:
    """Whether the batcher's thread let go (its ``_thread`` cleared) within ``within_s``."""
    for _ in range(round(within_s / 0.01)):
        if batcher._thread is None:
            return True
        await asyncio.sleep(0.01)
    return batcher._thread is None


def test_two_batchers_in_one_process_never_share_a_batch() -> None:
    async def go() -> None:
        a, b = Model("a"), Model("b")
        ba, bb = Batcher(a.run, 8, 0.01), Batcher(b.run, 8, 0.01)
        calls = [(ba if i % 2 else bb).submit(i, 1) for i in range(40)]
        done = await asyncio.gather(*calls)
        for i, d in enumerate(done):
            assert d.output == ("a" if i % 2 else "b", i)
        assert all(w % 2 == 1 for batch in a.batches for w in batch)
        assert all(w % 2 == 0 for batch in b.batches for w in batch)
        assert max(len(x) for x in a.batches) > 1  # they did batch

    run(go())


def test_batch_fills_to_its_size_in_units() -> None:
    async def go() -> None:
        model = Model("m")
        batcher = Batcher(model.run, 4, 5.0)  # a long wait: only a full batch may start it
        start = time.perf_counter()
        done = await asyncio.gather(*(batcher.submit(i, 2) for i in range(4)))
        assert [len(b) for b in model.batches] == [2, 2]
        assert {d.batch_size for d in done} == {4}
        assert time.perf_counter() - start < 2.0  # woken by the items that filled it, not the wait

    run(go())


def test_a_lone_item_waits_at_most_the_timeout() -> None:
    async def go() -> None:
        model = Model("m")
        done = await Batcher(model.run, 32, 0.05).submit("x", 1)
        assert 0.04 <= done.queue_wait_s < 1.0
        assert done.output == ("m", "x") and done.batch_size == 1

    run(go())


def test_an_item_larger_than_a_batch_runs_alone() -> None:
    async def go() -> None:
        model = Model("m")
        batcher = Batcher(model.run, 4, 0.01)
        small, big = batcher.submit("small", 1), batcher.submit("big", 9)
        assert [d.output[1] for d in await asyncio.gather(small, big)] == ["small", "big"]
        assert model.batches == [["small"], ["big"]]

    run(go())


def test_cancelled_waiter_leaves_the_queue_running_work_keeps_its_place() -> None:
    async def go() -> None:
        model = Model("m")
        model.release.clear()
        batcher = Batcher(model.run, 1, 0.0)
        first = asyncio.create_task(batcher.submit("first", 1))
        await asyncio.sleep(0.01)  # "first" is computing, held by the model
        second = asyncio.create_task(batcher.submit("second", 1))
        await asyncio.sleep(0.01)
        assert batcher.held == 2 and batcher.queued == 1
        second.cancel()
        first.cancel()  # its client went away, but its batch still computes
        await asyncio.sleep(0.01)
        assert batcher.queued == 0 and batcher.held == 1
        model.release.set()
        await asyncio.sleep(0.05)
        assert batcher.held == 0
        assert model.batches == [["first"]]  # "second" never ran

    run(go())


def test_a_failed_batch_reaches_every_caller_and_the_next_batch_runs() -> None:
    async def go() -> None:
        model = Model("m", fail=True)
        batcher = Batcher(model.run, 8, 0.01)
        results = await asyncio.gather(*(batcher.submit(i, 1) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert batcher.held == 0
        model.fail = False
        assert (await batcher.submit("after", 1)).output == ("m", "after")

    run(go())


def test_one_batch_at_a_time_and_the_next_forms_meanwhile() -> None:
    async def go() -> None:
        model = Model("m", delay_s=0.05)
        batcher = Batcher(model.run, 4, 0.0)
        first = asyncio.create_task(batcher.submit(0, 1))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.submit(i, 1)) for i in range(1, 6)]
        await asyncio.gather(first, *rest)
        assert model.batches == [[0], [1, 2, 3, 4], [5]]

    run(go())


def test_the_next_batch_starts_while_the_event_loop_is_busy() -> None:
    """The model's thread takes the next batch itself: a busy event loop (decoding the next
    requests, say) does not hold the model idle between batches."""

    async def go() -> None:
        model = Model("m")
        model.release.clear()
        batcher = Batcher(model.run, 1, 0.0, name="m")
        tasks = [asyncio.create_task(batcher.submit(0, 1))]
        while not model.batches:  # the thread is computing [0] and waits for the release
            await asyncio.sleep(0.001)
        tasks += [asyncio.create_task(batcher.submit(i, 1)) for i in (1, 2)]
        await asyncio.sleep(0)  # 1 and 2 are queued behind it
        threading.Timer(0.02, model.release.set).start()
        time.sleep(0.3)  # the loop runs nothing meanwhile
        assert model.batches == [[0], [1], [2]]
        assert [d.output for d in await asyncio.gather(*tasks)] == [("m", 0), ("m", 1), ("m", 2)]
        assert model.threads == {"m-batches"}
        assert batcher.held == 0

    run(go())


def test_an_idle_model_takes_what_one_pass_of_the_loop_queued() -> None:
    """An idle batcher thread wakes once the loop's pass that queued items is over, not at the
    first item: requests read in one pass share a batch even while the loop lets go of the
    interpreter lock between them (as its I/O does)."""

    async def go() -> None:
        model = Model("m")
        batcher = Batcher(model.run, 8, 0.0)
        await batcher.submit("warm", 1)  # its thread is up, then idle
        await asyncio.sleep(0.05)

        async def after_io(i: int) -> Any:
            time.sleep(0.02)  # the thread could take the lock (and the queue) meanwhile
            return await batcher.submit(i, 1)

        await asyncio.gather(*(after_io(i) for i in range(4)))
        assert model.batches[1:] == [[0, 1, 2, 3]]

    run(go())


def test_closed_batcher_drains_answers_a_late_caller_and_lets_go_again() -> None:
    """A replaced version's batcher: what is queued is answered, its thread ends; a late caller
    is answered too, and the thread ends again (it would otherwise hold the old model for good)."""

    async def go() -> None:
        model = Model("m")
        batcher = Batcher(model.run, 4, 0.01)
        pending = asyncio.create_task(batcher.submit("queued", 1))
        await asyncio.sleep(0)
        batcher.close()
        assert (await pending).output == ("m", "queued")
        assert await ended(batcher, within_s=2.0)
        assert (await batcher.submit("late", 1)).output == ("m", "late")
        assert await ended(batcher, within_s=2.0)

    run(go())


def test_an_idle_thread_ends_and_the_next_item_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "IDLE_EXIT_S", 0.05)

    async def go() -> None:
        model = Model("m")
        batcher = Batcher(model.run, 4, 0.0, name="m")
        assert (await batcher.submit(1, 1)).output == ("m", 1)
        first = batcher._thread
        assert await ended(batcher, within_s=3.0)
        assert first is not None and not first.is_alive()
        assert (await batcher.submit(2, 1)).output == ("m", 2)

    run(go())


def test_a_run_that_raises_anything_fails_its_batch_not_the_thread() -> None:
    """Even a BaseException out of ``run`` (SystemExit, say) reaches the batch's callers as an
    error; the thread keeps serving and the places are given back."""

    def run_once(works: list[Any]) -> list[Any]:
        if works == ["exit"]:
            raise SystemExit(3)
        return works

    async def go() -> None:
        batcher = Batcher(run_once, 1, 0.0)
        with pytest.raises(RuntimeError, match="SystemExit"):
            await batcher.submit("exit", 1)
        assert (await batcher.submit("after", 1)).output == "after"
        assert batcher.held == 0

    run(go())


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(Model("m").run, 0, 0.0)


def test_parts_of_one_request_stop_once_one_fails() -> None:
    """A request larger than a batch goes as batch-sized parts (``ModelWorker._batched``); once a
    part fails, the rest are withdrawn (``all_or_none``) instead of computed for nobody while they
    hold places other requests are refused for: here at most the part already taken runs."""
    from service.inference.callers import all_or_none

    async def go() -> tuple[int, int]:
        model = Model("m", delay_s=0.01, fail=True)
        batcher = Batcher(model.run, 1, 0.0)
        with pytest.raises(RuntimeError, match="m failed"):
            await all_or_none([batcher.submit(i, 1) for i in range(8)])
        await asyncio.sleep(0.1)
        return len(model.batches), batcher.held

    ran, held = run(go())
    assert ran <= 2 and held == 0, (ran, held)
