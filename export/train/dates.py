"""The ``dates`` corpus for ``export.train.translation``: generated examples, character tokenizers."""

from __future__ import annotations

from export.data import dates
from export.data.tokenizer import char_tokenizer
from export.train.translation import ParallelData


def prepare(n_train: int, seed: int) -> ParallelData:
    """The training examples (the train side of ``dates.splits``) and tokenizers built from them;
    the held-out side comes from ``export.evaluate.translation_test_set``."""
    train = list(dates.generate(n_train, seed))
    sources = [ex.source for ex in train]
    src_tok = char_tokenizer(sources, append_eos=True)
    tgt_tok = char_tokenizer("0123456789-", append_eos=False)
    return ParallelData(sources, [ex.target for ex in train], src_tok, tgt_tok)
