"""The decoding benchmark's load shapes (``benchmarks.decoding_load``) on a real model worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from benchmarks import decoding_load
from service.inference.jobs import TranslateJob


@pytest.mark.slow
def test_open_loop_latency_counts_from_arrival_when_the_sender_falls_behind(tiny_repository: Path) -> None:
    """The event loop held up for most of the run (as the work it measures can hold it): most
    arrivals are sent late, and their wait is in the latencies. Measured from the send, the p50
    was that of a tiny decode, ≈ 30 ms (coordinated omission); from the arrival it is ≈ 480."""
    worker = decoding_load.worker(tiny_repository / "dates-transformer" / "1", static=True)
    jobs = [TranslateJob(texts=["3 juin 1980"], max_length=10)]

    async def held_up() -> dict:
        async def hold() -> None:
            await asyncio.sleep(0.1)
            time.sleep(1.0)  # blocks the loop: no arrival is sent meanwhile

        holder = asyncio.ensure_future(hold())
        result = await decoding_load.open_loop(worker, jobs, rate=50, seconds=1.0)
        await holder
        return result

    try:
        result = asyncio.run(held_up())
    finally:
        worker.close()
    assert result["shed"] == 0 and result["late_p99_ms"] >= 800, result
    assert result["p50_ms"] >= 250 and result["p99_ms"] >= result["late_p99_ms"], result
