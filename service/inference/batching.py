"""The batching logic that is ours: which requests share a graph call.

The model's batcher (``service/inference/batcher.py``) forms a batch of *requests*; inside it,
translation requests are split by decoding options (beam size, max length, length penalty must
agree within a call) and then by source length, so one long input does not pad — and slow — a
whole batch of short ones.
Plain Python, unit-tested without Ray.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: a bucket's longest sequence may be at most this many times its shortest (plus slack below)
MAX_LENGTH_RATIO = 1.5
#: short sequences are cheap: lengths up to this never force a new bucket on their own
LENGTH_SLACK = 8


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[key(item)].append(i)
    return list(groups.values())


def length_buckets(
    lengths: Sequence[int],
    max_ratio: float = MAX_LENGTH_RATIO,
    slack: int = LENGTH_SLACK,
    max_size: int | None = None,
) -> list[list[int]]:
    """Split indices into buckets of similar length.

    Sorted by length, a bucket grows while its longest member is within ``max_ratio`` × its
    shortest (or within ``slack`` tokens of it) and it holds fewer than ``max_size`` members.
    Every index appears exactly once; within a bucket indices are in ascending length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            current = buckets[-1]
            shortest = lengths[current[0]]
            fits = lengths[i] <= max(shortest * max_ratio, shortest + slack)
            if fits and (max_size is None or len(current) < max_size):
                current.append(i)
                continue
        buckets.append([i])
    return buckets


def padding_waste(lengths: Sequence[int], buckets: list[list[int]]) -> float:
    """Share of padded positions across the buckets (0 = none)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    return 1 - sum(lengths) / padded if padded else 0.0
