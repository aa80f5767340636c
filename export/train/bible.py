"""The ``bible`` corpus for ``export.train.translation``: short verses of the training books and
BPE tokenizers learned on them (never on the test books)."""

from __future__ import annotations

import random

from export.data import bible
from export.data.tokenizer import subword_tokenizer
from export.train.translation import ParallelData


def prepare(max_words: int, vocab_size: int, n_train: int, seed: int) -> ParallelData:
    """At most ``n_train`` training verses (a seeded sample when fewer than all are asked for);
    the held-out books come from ``export.evaluate.translation_test_set``."""
    train, _ = bible.splits(max_words)
    if n_train < len(train):
        train = random.Random(seed).sample(train, n_train)
    sources, targets = [v.source for v in train], [v.target for v in train]
    return ParallelData(
        sources,
        targets,
        subword_tokenizer(sources, vocab_size, append_eos=True),
        subword_tokenizer(targets, vocab_size, append_eos=False),
        bucket=True,
    )
