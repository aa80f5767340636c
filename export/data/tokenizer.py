"""Tokenizers for the translation tasks, built with Hugging Face ``tokenizers``: characters for
the dates, BPE subwords for the Bible.

The files are ordinary ``tokenizer.json`` files, so the service loads them with the same library
that loads a subword tokenizer or a Marian checkpoint's: nothing in ``service/`` knows these are
characters. Offsets come for free, which is how gold character spans become token spans.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def char_tokenizer(texts: Iterable[str], append_eos: bool) -> Tokenizer:
    """One token per character seen in ``texts`` (NFC-normalised); unknown characters → ``<unk>``.

    ``append_eos`` makes ``encode`` end every sequence with ``</s>`` (what the encoder expects).
    """
    chars = sorted({c for text in texts for c in text})
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def subword_tokenizer(texts: Iterable[str], vocab_size: int, append_eos: bool) -> Tokenizer:
    """A BPE tokenizer (Sennrich et al. 2016) of at most ``vocab_size`` tokens learned on ``texts``.

    Spaces become ``▁`` word-initial markers (Metaspace, as in SentencePiece) and the matching
    decoder turns them back, so ``decode(ids, skip_special_tokens=True)`` in the service gives
    text with its spaces without knowing the model. The special tokens keep ids 0–3, as for
    :func:`char_tokenizer`; characters never seen in ``texts`` become ``<unk>``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    # punctuation split off words, so "her," and "her." share "▁her"; it carries no "▁", so the
    # decoder glues it back on: ["▁her", ","] → "her,"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
    if [tok.token_to_id(t) for t in SPECIALS] != [PAD_ID, BOS_ID, EOS_ID, UNK_ID]:
        raise AssertionError("the BPE trainer must place the special tokens first")
    return tok


def char_span_to_tokens(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``span`` (special tokens, whose
    offsets are empty, never do)."""
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
