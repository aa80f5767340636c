"""Triton-style statistics of a model version (``service/inference/statistics.py``): the counter
alone, then real workers — an image model on its batcher and translation models on their
schedulers (in process and in a decode process) — under concurrent mixed requests, good and bad."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from service.errors import InvalidInput, Overloaded
from service.inference.jobs import ClassifyJob, TranslateJob
from service.inference.repository import load_entry
from service.inference.statistics import Duration, Statistics
from service.inference.worker import ModelWorker
from service.settings import Settings
from tests.service.test_app import canvas_png

DATES = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999", "3 juin 1980", "1 mai 2001"]


def test_the_counter_adds_requests_and_executions() -> None:
    s = Statistics()
    s.answered(3, total_s=0.010, input_s=0.001, queue_s=0.002, infer_s=0.004)
    s.answered(1, total_s=0.005, input_s=0.001, queue_s=0.001, infer_s=0.004)
    s.failed(0.002)
    for size, seconds in ((4, 0.003), (1, 0.001), (4, 0.002)):
        s.executed(size, seconds)
    snap = s.snapshot("m", 2)
    assert (snap.name, snap.version, snap.inference_count, snap.execution_count) == ("m", 2, 4, 3)
    assert snap.success == Duration(2, 15_000_000)
    assert snap.fail == Duration(1, 2_000_000)
    assert (snap.compute_input.ns, snap.queue.ns, snap.compute_infer.ns) == (2_000_000, 3_000_000, 8_000_000)
    assert snap.compute_output == Duration(2, 3_000_000)  # 10 - 1 - 2 - 4, and 5 - 1 - 1 - 4 taken as 0
    assert snap.batches == {1: Duration(1, 1_000_000), 4: Duration(2, 5_000_000)}
    assert snap.last_inference_ms > 1_700_000_000_000
    s.answered(1, 0.001, 0, 0, 0)
    assert snap.inference_count == 4 and snap.success.count == 2, "a snapshot is a copy"


def worker(repository: Path, name: str, **settings: object) -> ModelWorker:
    entry = load_entry(repository, name, 1)
    return ModelWorker(entry, Settings(repository=repository, **settings), "replica", "node")  # type: ignore[arg-type]


def test_an_image_model_counts_images_batches_and_refusals(tiny_repository: Path) -> None:
    w = worker(tiny_repository, "fashion-vit", batching={"max_batch_size": 4})
    good = [ClassifyJob(image=canvas_png(seed)[0]) for seed in range(10)]
    bad = [ClassifyJob(image=b"not an image") for _ in range(3)]

    async def go() -> list[object]:
        jobs = good + bad
        random.Random(3).shuffle(jobs)
        return await asyncio.gather(*(w.predict(j) for j in jobs), return_exceptions=True)

    try:
        results = asyncio.run(go())
        assert sum(isinstance(r, InvalidInput) for r in results) == 3
        snap = asyncio.run(w.stats())
    finally:
        w.close()
    assert (snap.name, snap.version) == ("fashion-vit", 1)
    assert snap.inference_count == 10 and snap.success.count == 10 and snap.fail.count == 3
    # ten images in batches of at most 4: every image computed once, in at least three batches
    assert sum(size * d.count for size, d in snap.batches.items()) == 10
    assert max(snap.batches) <= 4 and 3 <= snap.execution_count <= 10
    assert snap.execution_count == sum(d.count for d in snap.batches.values())
    for d in (snap.queue, snap.compute_input, snap.compute_infer, snap.compute_output):
        assert d.count == 10
    assert 0 < snap.compute_infer.ns < snap.success.ns
    assert snap.queue.ns + snap.compute_input.ns + snap.compute_infer.ns <= snap.success.ns


@pytest.mark.parametrize("decode_process", [False, True])
@pytest.mark.parametrize("model", ["dates-transformer", "dates-bahdanau"])
def test_a_translation_model_counts_texts_and_decoder_steps(
    tiny_repository: Path, model: str, decode_process: bool
) -> None:
    w = worker(tiny_repository, model, decode_process=decode_process)
    rng = random.Random(5)
    jobs = [TranslateJob(texts=rng.sample(DATES, k=n), beam_size=b) for n in (1, 2, 3) for b in (1, 2)]

    async def go() -> None:
        await asyncio.gather(*(w.predict(j) for j in jobs))
        streamed = TranslateJob(texts=["3 juin 1980"], beam_size=1)
        async for _ in w.stream(streamed):  # a streamed request counts as one too
            pass

    try:
        asyncio.run(go())
        snap = asyncio.run(w.stats())
        w.capacity = 0  # every request is shed from now on: a failure
        with pytest.raises(Overloaded):
            asyncio.run(w.predict(jobs[0]))
        after = asyncio.run(w.stats())
    finally:
        w.close()
    assert snap.inference_count == 2 * (1 + 2 + 3) + 1 and snap.success.count == len(jobs) + 1
    assert snap.fail.count == 0 and after.fail.count == 1 and after.success == snap.success
    # decoder steps of the running batch: at least the longest translation's, each of ≥ 1 row
    assert 8 <= snap.execution_count == sum(d.count for d in snap.batches.values())
    assert min(snap.batches) >= 1
    assert snap.queue.count == snap.compute_infer.count == snap.success.count
    assert 0 < snap.compute_infer.ns <= snap.success.ns


def test_a_stream_its_decode_process_refuses_is_a_failure_as_a_call_is(tiny_repository: Path) -> None:
    """A replaced version whose decode child was told to end refuses what still reaches it (503):
    counted in ``fail`` over ``predict`` and, now, over ``stream`` too."""
    w = worker(tiny_repository, "dates-transformer", decode_process=True)
    w.close()  # replaced while idle: its child is told to end at once
    job = TranslateJob(texts=[DATES[0]])

    async def go() -> None:
        with pytest.raises(Overloaded, match="version was replaced"):
            await w.predict(job)
        with pytest.raises(Overloaded, match="version was replaced"):
            async for _ in w.stream(job):
                pass

    asyncio.run(go())
    snap = asyncio.run(w.stats())
    assert snap.fail.count == 2 and snap.success.count == 0
