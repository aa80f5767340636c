"""Length bucketing and option grouping, without Ray."""

from __future__ import annotations

import random

from service.inference.batching import group_by, length_buckets, padding_waste


def test_every_index_lands_in_exactly_one_bucket() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(500)]
    buckets = length_buckets(lengths, max_size=32)
    assert sorted(i for b in buckets for i in b) == list(range(500))
    assert all(len(b) <= 32 for b in buckets)
    for b in buckets:
        lo, hi = lengths[b[0]], lengths[b[-1]]
        assert hi <= max(lo * 1.5, lo + 8)


def test_one_long_input_does_not_pad_the_short_ones() -> None:
    lengths = [10, 11, 12, 9, 200, 10]
    buckets = length_buckets(lengths)
    assert [4] in buckets
    assert padding_waste(lengths, buckets) < 0.1
    assert padding_waste(lengths, [list(range(6))]) > 0.7  # what one padded batch would waste


def test_group_by_keeps_first_appearance_order() -> None:
    items = [("beam", 1), ("beam", 3), ("beam", 1), ("beam", 2), ("beam", 3)]
    assert group_by(items, key=lambda x: x[1]) == [[0, 2], [1, 4], [3]]
