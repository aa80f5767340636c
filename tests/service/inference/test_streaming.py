"""Streamed translations in the inference core (``ModelWorker.stream`` over the scheduler), on
real exported models without Ray: every token arrives as its step chooses it and the stream
equals the answer (tokens, text, attention rows), under concurrent mixed traffic on two models;
beam search answers alone; a caller that leaves frees its rows at the next step while the others
decode on, undisturbed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export import checkpoint
from export.models.transformer import Transformer
from service.inference import attention as maps
from service.inference.jobs import Answer, TokenEvent, TranslateJob
from service.inference.manifest import Manifest
from service.inference.repository import ModelEntry
from service.inference.worker import ModelWorker, NoMetrics
from service.settings import Settings

pytestmark = pytest.mark.slow
DATES = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999", "3 juin 1980", "Samstag, 15. Mai 1976",
         "1 janvier 2000", "martes, 9 de abril de 2019", "Dec 24, 1850", "7/8/2011"]  # fmt: skip


class RowsSeen(NoMetrics):
    """The worker's rows-in-flight gauge as it reports it after every step."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def stepped(self, rows: int, tokens: int, steps: int = 1) -> None:
        self.rows.append(rows)


def worker(
    version: Path, metrics: Any = None, interval_ms: float = 0.0, decode_process: bool = True
) -> ModelWorker:
    entry = ModelEntry(version.parent.name, int(version.name), version, Manifest.load(version))
    settings = Settings(
        repository=version.parent.parent, stream_interval_ms=interval_ms, decode_process=decode_process
    )
    return ModelWorker(entry, settings, "r", "n", metrics)


def endless(tiny_repository: Path, directory: Path) -> Path:
    """dates-transformer's architecture with random weights that never choose EOS, 500 target
    tokens allowed: a decode that runs until it is stopped."""
    from benchmarks.decoding import export_version

    trained = checkpoint.load(tiny_repository.parent / "checkpoints" / "dates-transformer").model
    assert isinstance(trained, Transformer)
    torch.manual_seed(3)
    model = Transformer(dataclasses.replace(trained.cfg, max_len=512)).eval()
    like = tiny_repository / "dates-transformer" / "1"
    eos = Manifest.load(like).translation.target_tokenizer.eos_id  # type: ignore[union-attr]
    with torch.no_grad():
        model.generator.bias[eos] = -1e4
    return export_version(model, like, directory / "dates-transformer" / "1", "kv", 500)


@pytest.fixture(scope="module")
def endless_version(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless(tiny_repository, tmp_path_factory.mktemp("endless"))


async def collect(w: ModelWorker, job: TranslateJob) -> tuple[list[TokenEvent], Answer, list[float]]:
    """The events of one stream and when each arrived (s after the call)."""
    start, items, times = time.perf_counter(), [], []
    async for item in w.stream(job):
        times.append(time.perf_counter() - start)
        items.append(item)
    *steps, answer = items
    assert isinstance(answer, Answer) and all(isinstance(s, list) and s for s in steps)
    tokens = [t for step in steps for t in step]
    assert all(isinstance(t, TokenEvent) for t in tokens)
    return tokens, answer, times


def check_stream(tokens: list[TokenEvent], answer: Answer, job: TranslateJob) -> None:
    """The stream is the answer, token by token."""
    for i, t in enumerate(answer.result.translations):  # type: ignore[union-attr]
        mine = [e for e in tokens if e.text_index == i]
        assert [e.index for e in mine] == list(range(len(t.target_tokens)))
        assert [e.token for e in mine] == t.target_tokens
        assert "".join(e.piece for e in mine) == t.text
        if job.attention != "none":
            rows = np.stack([e.alignment for e in mine])  # type: ignore[misc]
            np.testing.assert_allclose(rows, maps.alignment(t.attention), atol=1e-5)
        if job.attention == "all" and t.attention.ndim == 4:  # a Transformer's every layer and head
            np.testing.assert_allclose(np.stack([e.layers for e in mine]), t.attention, atol=1e-5)  # type: ignore[misc]


def test_streams_equal_answers_under_mixed_traffic(tiny_repository: Path) -> None:
    # one model streams every step's tokens, the other holds them within the default interval
    workers = {
        n: worker(tiny_repository / n / "1", interval_ms=ms)
        for n, ms in (("dates-transformer", 16.0), ("dates-bahdanau", 0.0))
    }
    jobs = [
        (
            name,
            TranslateJob(texts=DATES[i % 5 : i % 5 + 1 + i % 4], attention=("none", "default", "all")[i % 3]),
        )
        for i in range(16)
        for name in workers
    ]

    async def go() -> None:
        streamed = asyncio.gather(*(collect(workers[n], j) for n, j in jobs))
        plain = asyncio.gather(*(workers[n].predict(j) for n, j in jobs))  # the same traffic, not streamed
        for (name, job), (tokens, answer, times), alone in zip(
            jobs, await streamed, await plain, strict=True
        ):
            assert answer.model == name and tokens, "greedy decodes stream their tokens"
            check_stream(tokens, answer, job)
            assert [t.text for t in answer.result.translations] == [t.text for t in alone.result.translations]  # type: ignore[union-attr]
            assert times[0] < times[-1] and answer.metrics.time_to_first_token_ms is not None

    asyncio.run(go())


@pytest.mark.parametrize("decode_process", [True, False], ids=["decode-process", "thread"])
def test_tokens_within_the_interval_travel_together(endless_version: Path, decode_process: bool) -> None:
    """With ``stream_interval_ms`` later tokens come in items at least the interval apart (the
    last with the answer's turn), far fewer items than steps; the tokens are those sent step by
    step (a step's, or several when the reader was busy). The scheduler holds them, in a decode
    process or on the worker's thread alike."""
    job = TranslateJob(texts=DATES[:2], max_length=300)
    every = worker(endless_version, decode_process=decode_process)
    framed = worker(endless_version, interval_ms=25, decode_process=decode_process)

    async def go(w: ModelWorker) -> tuple[list[list[TokenEvent]], list[float], Answer]:
        start, items, times = time.perf_counter(), [], []
        async for item in w.stream(job):
            times.append(time.perf_counter() - start)
            items.append(item)
        *steps, answer = items
        assert isinstance(answer, Answer)
        return steps, times[:-1], answer  # type: ignore[return-value]

    stepwise, _, alone = asyncio.run(go(every))
    items, times, answer = asyncio.run(go(framed))
    assert [t.index for t in items[0][:2]] == [0, 0], "the first item starts with each text's first token"
    gaps = np.diff(times[:-1])  # the last item goes when the decode ends, whatever the interval
    # held where the tokens are chosen: the interval is the scheduler's, this loop adds its jitter
    assert len(gaps) and np.median(gaps) >= 0.025 * 0.9 and gaps.min() >= 0.025 / 2, gaps
    assert len(items) <= times[-1] / 0.025 + 2 < 300
    assert [t.token_id for i in items for t in i] == [t.token_id for i in stepwise for t in i]
    check_stream([t for i in items for t in i], answer, job)
    assert [t.target_tokens for t in answer.result.translations] == [  # type: ignore[union-attr]
        t.target_tokens
        for t in alone.result.translations  # type: ignore[union-attr]
    ]


def test_beam_search_answers_alone(tiny_repository: Path) -> None:
    w = worker(tiny_repository / "dates-transformer" / "1")

    async def go() -> list[Any]:
        return [e async for e in w.stream(TranslateJob(texts=DATES[:3], beam_size=3))]

    [answer] = asyncio.run(go())
    assert isinstance(answer, Answer) and answer.result.translations[0].text == "2024-03-05"  # type: ignore[union-attr]


def test_a_caller_that_leaves_frees_its_rows(endless_version: Path, tiny_repository: Path) -> None:
    """Two endless streams of 8 texts each: one caller leaves after its first tokens — its rows
    leave the batch at the next steps — while the other decodes on to its limit, with the tokens
    it gets alone."""
    rows = RowsSeen()
    w = worker(endless_version, rows)
    leaving = TranslateJob(texts=DATES[:8], max_length=400)
    staying = TranslateJob(texts=DATES[1:9], max_length=60)

    async def go() -> tuple[int, Answer]:
        stream = w.stream(leaving)
        other = asyncio.ensure_future(collect(w, staying))
        received = 0
        while received < 16 or 16 not in rows.rows:  # two steps of the leaving request, one shared
            received += len(await anext(stream))
        assert w.scheduler is not None and w.scheduler.rows == 16
        await stream.aclose()  # type: ignore[attr-defined]
        # every step whose tokens arrived is counted in steps; the stepping thread records its rows
        # just after handing the tokens over, so the record may still be on its way
        seen = w.scheduler.steps
        for _ in range(2000):
            if len(rows.rows) >= seen:
                break
            await asyncio.sleep(0.001)
        tokens, answer, _ = await other
        check_stream(tokens, answer, staying)
        return seen, answer

    seen, answer = asyncio.run(go())
    # the child's last report of its rows may still be on its way after the staying answer
    # (under load: rows read 8, the staying text's, once in a run beside other tests)
    deadline = time.monotonic() + 5
    while w.scheduler is not None and w.scheduler.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.scheduler is not None and w.scheduler.rows == 0 and w.scheduler.held == 0
    # The decode process steps on its own: the parent's count of steps (``seen``) trails the child's
    # by the reports still on their way, and the release reaches the child between two of its
    # steps, so a few more steps of 16 rows may follow ``seen`` (three once, in a CI run). Then the
    # leaving rows are gone for good — long before the staying text's 60 tokens, which would keep
    # 16 rows for ≈ 57 more steps if the release were lost.
    after = rows.rows[seen:]
    assert 16 in rows.rows[:seen] and after, rows.rows
    last_16 = max(i for i, n in enumerate(after) if n == 16) if 16 in after else -1
    assert last_16 < 8 and all(n <= 8 for n in after[last_16 + 1 :]), rows.rows
    assert all(len(t.target_tokens) == 60 for t in answer.result.translations)  # type: ignore[union-attr]

    async def alone() -> Answer:
        return await w.predict(staying)

    assert [t.target_tokens for t in asyncio.run(alone()).result.translations] == [  # type: ignore[union-attr]
        t.target_tokens
        for t in answer.result.translations  # type: ignore[union-attr]
    ]
