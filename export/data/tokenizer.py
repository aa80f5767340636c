"""Character-level tokenizers for the demo tasks, built with Hugging Face ``tokenizers``.

The files are ordinary ``tokenizer.json`` files, so the service loads them with the same library
that loads a subword tokenizer or a Marian checkpoint's: nothing in ``service/`` knows these are
characters. Offsets come for free, which is how gold character spans become token spans.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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


def char_span_to_tokens(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``span`` (special tokens, whose
    offsets are empty, never do)."""
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
