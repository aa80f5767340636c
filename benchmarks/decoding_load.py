"""In-process load on a translation model's worker, for ``make bench-decoding``: closed-loop
clients, open-loop Poisson arrivals, short requests among long ones, and the worker built as a
replica holds it (with the scheduler, or with static batches as before it).

The server side is the model's ``ModelWorker`` in this process, driven by asyncio clients, so the
figures are the scheduling, not HTTP. Free of torch: ``benchmarks/ct2_offline.py`` uses it too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import percentile
from service.errors import Overloaded
from service.inference.jobs import Answer, Translated, TranslateJob
from service.inference.manifest import Manifest
from service.inference.model_set import freeze_heap, take_turns
from service.inference.repository import ModelEntry
from service.inference.translation import CROSS, PAST, RowBatch, Translator
from service.inference.worker import ModelWorker
from service.settings import Batching, Settings

TEXTS = [
    "5 mars 2024",
    "Tuesday, July 4, 1995",
    "31.12.1999",
    "12 de mayo de 2003",
    "3 juin 1980",
    "Samstag, 15. Mai 1976",
    "9/9/1986",
    "mar, 31 mar 2009",
]


async def calling(
    worker: ModelWorker, jobs: list[Any], clients: int, seconds: float
) -> tuple[list[tuple[float, Answer]], float]:
    """``clients`` callers of ``worker`` in this process, each sending its next job as soon as
    the last is answered, for ``seconds`` → ``(latency s, answer)`` of every request, and the
    seconds it took."""
    done: list[tuple[float, Answer]] = []
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            start = time.perf_counter()
            answer = await worker.predict(jobs[k % len(jobs)])
            done.append((time.perf_counter() - start, answer))
            k += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done, time.perf_counter() - start


async def closed_loop(
    worker: ModelWorker, jobs: list[TranslateJob], clients: int, seconds: float
) -> dict[str, Any]:
    """:func:`calling` on translations: requests/s, target tokens/s, p50/p99 and the mean time
    per output token the answers report."""
    done, elapsed = await calling(worker, jobs, clients, seconds)
    latencies = [s for s, _ in done]
    per_token: list[float] = []
    tokens = 0
    for _, answer in done:
        assert isinstance(answer.result, Translated)
        tokens += answer.result.tokens_generated
        if answer.metrics.time_per_output_token_ms is not None:
            per_token.append(answer.metrics.time_per_output_token_ms)
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_time_per_output_token_ms": statistics.fmean(per_token) if per_token else None,
    }


async def open_loop(
    worker: ModelWorker, jobs: list[TranslateJob], rate: float, seconds: float
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s (seeded), each answered whenever it is done. A
    latency counts from the request's arrival time, not from when this loop got round to sending
    it: a loop held up by the work it measures would otherwise leave out the wait it caused
    (coordinated omission). ``late_p99_ms`` says how far behind the arrivals the sending ran."""
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    late: list[float] = []
    shed = 0

    async def one(job: TranslateJob, arrival: float) -> None:
        nonlocal shed
        late.append(time.perf_counter() - arrival)
        try:
            await worker.predict(job)
        except Overloaded:  # past the model's queue limit: the service answers 503
            shed += 1
            return
        latencies.append(time.perf_counter() - arrival)

    tasks, k = [], 0
    start = time.perf_counter()
    next_at = start
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one(jobs[k % len(jobs)], next_at)))
        k += 1
        next_at += rng.exponential(1 / rate)
    await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "late_p99_ms": percentile(late, 99) * 1000,
        "shed": shed,
    }


async def _mixed(worker: ModelWorker, seconds: float, longs: int = 8, shorts: int = 8) -> dict[str, Any]:
    """``longs`` clients of long requests and ``shorts`` of short ones at once; the short ones' latencies."""
    long_job = TranslateJob(texts=["Samstag, 15. Mai 1976"], max_length=100)
    short = [TranslateJob(texts=[t], max_length=10) for t in TEXTS]
    stop = time.perf_counter() + seconds
    short_latencies: list[float] = []

    long_tokens: list[int] = []

    async def long_client() -> None:
        while time.perf_counter() < stop:
            answer = await worker.predict(long_job)
            assert isinstance(answer.result, Translated)
            long_tokens.append(answer.result.tokens_generated)

    async def short_client(i: int) -> None:
        await asyncio.sleep(0.05 + i * 0.01)  # after the long ones started
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await worker.predict(short[i % len(short)])
            short_latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(long_client() for _ in range(longs)), *(short_client(i) for i in range(shorts)))
    return {
        "short_p50_ms": percentile(short_latencies, 50) * 1000,
        "short_p99_ms": percentile(short_latencies, 99) * 1000,
        "short_requests": len(short_latencies),
        "long_tokens_mean": statistics.fmean(long_tokens) if long_tokens else 0.0,
    }


#: (c)'s parts, (long clients, short clients): what the 8 + 8 mix's short latency is made of —
#: short requests sharing steps with each other, and with long ones
PARTS = {"8 short alone": (0, 8), "1 short among 8 long": (8, 1), "8 short among 8 long": (8, 8)}


async def _solo(worker: ModelWorker, job: TranslateJob, n: int = 30, warm: int = 10) -> float:
    """Median latency of ``job`` alone, after ``warm`` untimed calls: a fresh worker's first
    requests pay one-time costs (on CUDA its first 30 ran ~1.5 × slower than later ones), which
    would inflate the baseline every mix is judged against."""
    for _ in range(warm):
        await worker.predict(job)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await worker.predict(job)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def solo_then_mixed(w: ModelWorker, seconds: float) -> tuple[float, dict[str, Any]]:
    """(e) then (c), on one event loop (a worker's queue belongs to the loop it first ran on).
    With the scheduler, also the mean decoder step (ms, Python included) and rows per step in
    each phase: a short request shares steps with the long ones, so ten of its steps cost ten
    steps of the whole batch — the floor under its latency — and (``parts``) the short p50 of
    :data:`PARTS`' mixes, each against the same solo latency. The solo latency is measured before
    and after the mixes, and the lower of the two is the one reported and judged against (a lone
    request's latency varies between runs of 30: ~2.2 or ~4.4 ms on this CPU)."""
    steps: list[tuple[int, float]] = []
    if w.scheduler is not None:
        w.scheduler.on_step = lambda rows, live, tokens, s: steps.append((rows, s)) if rows else None
    lone = TranslateJob(texts=["3 juin 1980"], max_length=10)
    before = await _solo(w, lone)
    alone, steps[:] = list(steps), []
    mixed = await _mixed(w, seconds)
    for phase, seen in (("solo", alone), ("mixed", steps)):
        if seen:
            mixed[f"{phase}_step_ms"] = statistics.fmean(s for _, s in seen) * 1000
            mixed[f"{phase}_rows_per_step"] = statistics.fmean(r for r, _ in seen)
    parts: dict[str, dict[str, Any]] = {}
    if w.scheduler is not None:
        for part, (longs, shorts) in PARTS.items():
            parts[part] = mixed if (longs, shorts) == (8, 8) else await _mixed(w, seconds, longs, shorts)
    after = await _solo(w, lone, warm=0)
    solo = min(before, after)
    mixed |= {"solo_before_ms": before, "solo_after_ms": after}
    if parts:
        mixed["parts"] = {
            part: {"short_p50_ms": m["short_p50_ms"], "vs_solo": m["short_p50_ms"] / solo}
            for part, m in parts.items()
        }
    return solo, mixed


def median_round(rounds: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """``mode``'s run of the round with the median ratio to that round's offline rate, with the
    ratio (each round's served run against the offline decode measured around it)."""
    ratios = [r[mode]["tokens_per_s"] / r["offline_tokens_per_s"] for r in rounds]
    middle = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]
    return {**rounds[middle][mode], "ratio_to_offline": ratios[middle], "ratios": ratios}


def worker(directory: Path, static: bool, providers: list[str] | None = None) -> ModelWorker:
    """The model's worker as a replica holds it (the scheduler's loop in a decode process);
    ``static``: its static batcher with the wait the service used before the scheduler (5 ms), as
    a baseline (the graphs in this process). ``providers``: the settings' default (CPU) unless
    given (the GPU check's CUDA)."""
    batching = Batching(max_batch_size=32, batch_wait_timeout_s=0.005 if static else 0.0)
    settings = Settings(
        repository=directory.parent.parent,
        batching=batching,
        intra_op_threads=1,
        decode_process=not static,
    )
    if providers:
        settings = settings.model_copy(update={"providers": providers})
    w = ModelWorker(
        ModelEntry(directory.parent.name, 1, directory, Manifest.load(directory)), settings, "bench", "local"
    )
    if static:
        w.scheduler = None
    take_turns(settings)  # as a serving process does (ModelSet): 5 ms by default, 0.5 ms served
    freeze_heap()  # as a serving process does once its models are loaded (ModelSet.serve)
    return w


def step_feeds(translator: Translator, rows: RowBatch, past: int) -> dict[str, np.ndarray]:
    """The feeds of one KV-cached decoder step for ``rows`` (encoded) over a random cache of
    ``past`` positions, every row holding all of them — whichever cache layout the graph has."""
    rng = np.random.default_rng(0)
    n = len(rows)
    cache = {}
    for name in translator.past_names:
        cross = rows.tensors[CROSS + name.removeprefix(PAST)]
        cache[name] = rng.standard_normal((*cross.shape[:-2], past, cross.shape[-1]), dtype=np.float32)
    return {
        "tokens": np.full(n, 5),
        "positions": np.full(n, past),
        "past_mask": np.ones((n, past), dtype=bool),
        "src_mask": rows.src_mask,
        **rows.tensors,
        **cache,
    }
