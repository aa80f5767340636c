"""The model worker on the tiny exported models, without Ray or HTTP: preprocessing that would
hold the replica's event loop (a large image's decoding, long texts' tokenising) runs in a thread,
and answers as it does on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.errors import Overloaded
from service.inference.jobs import Answer, Classified, ClassifyJob, Translated, TranslateJob
from service.inference.repository import load_entry
from service.inference.runners import INLINE_CHARS
from service.inference.worker import ModelWorker
from service.settings import Settings
from tests.service.test_event_loop import png

pytestmark = pytest.mark.slow


def worker(repository: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelWorker, list[int]]:
    """The worker, and the threads its runner's preprocessing ran on, in order."""
    w = ModelWorker(load_entry(repository, name, 1), Settings(repository=repository, decode_process=False),
                    "replica", "node")  # fmt: skip
    threads: list[int] = []
    real: Callable[[Any], Any] = w.runner.preprocess

    def preprocess(job: Any) -> Any:
        threads.append(threading.get_ident())
        return real(job)

    monkeypatch.setattr(w.runner, "preprocess", preprocess)
    return w, threads


def test_large_images_are_preprocessed_off_the_loop_and_answered_as_their_small_copy(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, threads = worker(tiny_repository, "fashion-vit", monkeypatch)

    async def main() -> tuple[int, list[Answer]]:
        jobs = [
            ClassifyJob(image=png(48, 90)),
            ClassifyJob(image=png(1000, 90), attention="rollout"),
            ClassifyJob(pixels=np.full((600, 600), 90.0)),
        ]
        return threading.get_ident(), [await w.predict(j) for j in jobs]

    try:
        loop, (small, *large) = asyncio.run(main())
    finally:
        w.close()
    assert threads[0] == loop and loop not in threads[1:] and len(threads) == 3
    noise = io.BytesIO()  # 64 × 64 pixels, but 12 kB over INLINE_BYTES: Pillow reads headers in Python
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(noise, "PNG")
    assert not w.runner.inline(ClassifyJob(image=noise.getvalue()))
    assert isinstance(small.result, Classified)
    for answer in large:
        assert isinstance(answer.result, Classified) and answer.result.labels == small.result.labels
        np.testing.assert_allclose(answer.result.probabilities, small.result.probabilities, atol=1e-6)
    assert isinstance(large[0].result, Classified) and large[0].result.rollout is not None
    assert large[0].result.rollout.shape == w.runner.spec.grid


def test_long_texts_are_tokenised_off_the_loop_and_translated_as_on_it(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three texts of 400 characters (1,200 > ``INLINE_CHARS``) in one request, whole and as a
    stream, translate as each does alone on the loop (cut to the model's 64 source tokens)."""
    texts = [" ".join(f"{d} mars {1900 + d}" for d in range(i, i + 40))[:400] for i in (1, 5, 9)]
    assert sum(map(len, texts)) > INLINE_CHARS >= max(map(len, texts))
    w, threads = worker(tiny_repository, "dates-transformer", monkeypatch)

    async def main() -> tuple[int, list[Answer], Answer, Answer]:
        alone = [await w.predict(TranslateJob([t], truncate=True)) for t in texts]
        whole = await w.predict(TranslateJob(texts, truncate=True))
        async with contextlib.aclosing(w.stream(TranslateJob(texts, truncate=True))) as events:
            streamed = [event async for event in events][-1]
        assert isinstance(streamed, Answer)
        return threading.get_ident(), alone, whole, streamed

    try:
        loop, alone, whole, streamed = asyncio.run(main())
    finally:
        w.close()
    assert threads[:3] == [loop] * 3 and len(threads) == 5 and loop not in threads[3:]
    want = [a.result.translations[0].target_tokens for a in alone if isinstance(a.result, Translated)]
    for answer in (whole, streamed):
        assert isinstance(answer.result, Translated)
        assert [t.target_tokens for t in answer.result.translations] == want


def test_images_preprocessed_in_a_thread_hold_their_place_in_the_capacity(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request counts against the worker's capacity from its admission on: eight large images at
    once against a capacity of two are two answers and six refusals, as on the loop (counted only
    once preprocessed, all eight passed the check before any was)."""
    w, _ = worker(tiny_repository, "fashion-vit", monkeypatch)
    w.capacity = 2
    large = png(1000, 90)

    async def one() -> str:
        try:
            await w.predict(ClassifyJob(image=large))
        except Overloaded:
            return "shed"
        return "ok"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(one() for _ in range(8))))

    try:
        outcomes = asyncio.run(main())
    finally:
        w.close()
    assert sorted(outcomes) == ["ok"] * 2 + ["shed"] * 6 and w.held == 0


@pytest.mark.parametrize("name", ["fashion-vit", "dates-transformer"])
def test_a_batch_or_step_that_never_returns_makes_the_model_unhealthy(
    tiny_repository: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call into ONNX Runtime that hangs (a batch of images on the batcher's thread, a decoder
    step on the in-process scheduler's): its requests time out and every new one is shed, while
    the replica's health check passed for good. After HUNG_S it names what hangs, so Ray replaces
    the replica; once the call returns, the model is healthy again."""
    from service.inference import decode_process

    monkeypatch.setattr(decode_process, "HUNG_S", 0.3)
    w, _ = worker(tiny_repository, name, monkeypatch)
    release = threading.Event()
    hung = w.runner.infer if w.scheduler is None else w.scheduler.decoder.step

    def hanging(*args: Any, **kwargs: Any) -> Any:
        release.wait(20)
        return hung(*args, **kwargs)

    if w.scheduler is None:
        monkeypatch.setattr(w.runner, "infer", hanging)
        job: Any = ClassifyJob(image=png(28, 28))
    else:
        monkeypatch.setattr(w.scheduler.decoder, "step", hanging)
        job = TranslateJob(texts=["3 juin 1980"])

    async def main() -> tuple[str | None, str | None]:
        request = asyncio.create_task(w.predict(job))
        await asyncio.sleep(0.1)
        early = w.problem()  # computing, not yet for HUNG_S
        await asyncio.sleep(0.5)
        late = w.problem()
        release.set()
        await request
        return early, late

    try:
        early, late = asyncio.run(main())
    finally:
        release.set()
        w.close()
    what = "a batch" if name == "fashion-vit" else "a decoder step"
    assert early is None and late is not None and late.startswith(f"{what} has run for"), (early, late)
    assert w.problem() is None
