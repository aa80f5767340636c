"""The deterministic stand-in decoder of the translation-scheduler tests, and the helpers they
share (``test_scheduler``, ``test_scheduler_leaving``, ``test_running_batch``, the decode-process
tests and the factories of ``decode_stand_ins``): no Ray, no ONNX Runtime.

``TableDecoder`` is a numpy stand-in with the ``transformer-kv-layers`` shapes (one layer): its
"encoder" keeps the source ids (right-padded, like a real batch), its cache holds the tokens each
row fed (left-padded, masked), and a row's logits depend only on its own source, its own unmasked
past and its position. So a row mixed up with another, a cache reordered wrongly for a beam, or
a padding column read would change that request's answer against the same text decoded alone
(``alone``).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from service.inference.decoding import Options, new_search, run_searches
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
